//! PyTorch checkpoints: `torch.save` zip archives holding a pickled state dict, read as f64.
//!
//! The pickle itself is parsed by `candle_core::pickle::Stack`, which covers torch's default
//! pickle protocol 2. Tensors are rebuilt here rather than with candle's `PthTensors`, because
//! candle rejects bool storages and non-contiguous views (strides other than row- or
//! column-major), and both occur in real checkpoints (TransformerLens' `attn.mask`, weights
//! saved as transposed views). The zip container is read here too (stored or deflated entries,
//! zip64 included): candle's zip dependency is not re-exported, and the format is small.

use crate::tensor::HostTensor;
use anyhow::{anyhow, bail, Context};
use candle_core::pickle::{Object, Stack};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Reads every tensor of a PyTorch state dict. Accepts a bare state dict or one nested one level
/// down (under `state_dict`, `model_state_dict`, `model`, ...). Float, integer and bool tensors
/// become f64; scalars get shape `[]`. Non-tensor entries (torch's `_metadata`) are skipped.
pub fn load_pt(path: &Path) -> anyhow::Result<BTreeMap<String, HostTensor>> {
    // One line, file first: `{}` of the returned error is the whole story.
    load_inner(path).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

fn load_inner(path: &Path) -> anyhow::Result<BTreeMap<String, HostTensor>> {
    let mut zip = Zip::open(path)?;
    let pkl_name = zip
        .entries
        .iter()
        .map(|e| e.name.as_str())
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .context("zip archive has no data.pkl: not a torch.save checkpoint")?
        .to_string();
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
    let big_endian = match zip.find(&format!("{prefix}byteorder")) {
        Some(i) => match zip.read(i)?.as_slice() {
            b"little" => false,
            b"big" => true,
            other => bail!("unknown byteorder {:?}", String::from_utf8_lossy(other)),
        },
        // Archives written before torch recorded the byte order are little-endian.
        None => false,
    };
    let pkl_index = zip.find(&pkl_name).context("data.pkl vanished")?;
    let pkl = zip.read(pkl_index)?;
    super::pickle_scan::scan(&pkl)?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut pkl.as_slice()).map_err(pickle_error)?;
    let top = stack.finalize().map_err(pickle_error)?;
    let dict = state_dict(&top)?;
    let mut out = BTreeMap::new();
    for (key, value) in dict {
        let Object::Unicode(name) = key else { continue };
        if let Some(t) = rebuild(value, name, &mut zip, &prefix, big_endian)? {
            out.insert(name.clone(), t);
        }
    }
    Ok(out)
}

fn pickle_error(e: candle_core::Error) -> anyhow::Error {
    // candle attaches a multi-line backtrace to its errors when `RUST_BACKTRACE` is set.
    let e = match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        e => e,
    };
    anyhow!("cannot parse data.pkl (truncated, or not pickle protocol 2): {e}")
}

/// Keys under which training scripts commonly nest the state dict.
const NESTED_KEYS: [&str; 6] = [
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "weights",
];

/// The dict whose values are the tensors: the top-level dict if it holds any tensor, else the
/// one nested dict that does (preferring [`NESTED_KEYS`]).
fn state_dict(top: &Object) -> anyhow::Result<&[(Object, Object)]> {
    let Object::Dict(pairs) = top else {
        bail!(
            "not a state dict: the checkpoint holds {}, not a dict of tensors",
            describe(top)
        );
    };
    let has_tensors = |pairs: &[(Object, Object)]| pairs.iter().any(|(_, v)| tensor_call(v));
    if has_tensors(pairs) {
        return Ok(pairs);
    }
    let nested: Vec<(&str, &[(Object, Object)])> = pairs
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Object::Unicode(k), Object::Dict(d)) if has_tensors(d) => Some((k.as_str(), &d[..])),
            _ => None,
        })
        .collect();
    for key in NESTED_KEYS {
        if let Some((_, d)) = nested.iter().find(|(k, _)| *k == key) {
            return Ok(d);
        }
    }
    if let [(_, d)] = nested[..] {
        return Ok(d);
    }
    let keys: Vec<String> = pairs
        .iter()
        .take(8)
        .map(|(k, _)| match k {
            Object::Unicode(s) => format!("{s:?}"),
            other => describe(other).to_string(),
        })
        .collect();
    if nested.is_empty() {
        bail!(
            "not a state dict: no tensors at the top level or one level down (keys: {})",
            keys.join(", ")
        );
    }
    bail!(
        "ambiguous checkpoint: several nested dicts hold tensors ({}) and none is named {}",
        nested
            .iter()
            .map(|(k, _)| format!("{k:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        NESTED_KEYS.join("/")
    )
}

fn describe(o: &Object) -> &'static str {
    match o {
        Object::Class { .. } => "a class",
        Object::Int(_) | Object::Long(_) => "an integer",
        Object::Float(_) => "a float",
        Object::Unicode(_) => "a string",
        Object::Bool(_) => "a bool",
        Object::None => "None",
        Object::Tuple(_) => "a tuple",
        Object::List(_) => "a list",
        Object::Dict(_) => "a dict",
        Object::Reduce { .. } if tensor_call(o) => "a single tensor",
        Object::Reduce { .. } | Object::Build { .. } => "an object",
        Object::Mark | Object::PersistentLoad(_) => "a malformed pickle",
    }
}

/// The `(module, function, args)` of a pickled call.
fn call(o: &Object) -> Option<(&str, &str, &Object)> {
    match o {
        Object::Reduce { callable, args } => match callable.as_ref() {
            Object::Class {
                module_name,
                class_name,
            } => Some((module_name, class_name, args)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `o` is how torch pickles a tensor or parameter.
fn tensor_call(o: &Object) -> bool {
    matches!(
        call(o),
        Some(("torch._utils" | "torch._tensor", f, _)) if f.starts_with("_rebuild_")
    )
}

fn tuple(o: &Object) -> Option<&[Object]> {
    match o {
        Object::Tuple(v) => Some(v),
        _ => None,
    }
}

fn int(o: &Object) -> Option<i64> {
    match o {
        Object::Int(i) => Some(*i as i64),
        Object::Long(i) => Some(*i),
        _ => None,
    }
}

fn usizes(o: &Object) -> Option<Vec<usize>> {
    tuple(o)?
        .iter()
        .map(|v| int(v).and_then(|i| usize::try_from(i).ok()))
        .collect()
}

/// Rebuilds the tensor pickled as `value` (None when it is not a tensor).
fn rebuild(
    value: &Object,
    name: &str,
    zip: &mut Zip,
    prefix: &str,
    big_endian: bool,
) -> anyhow::Result<Option<HostTensor>> {
    let Some((module, func, args)) = call(value) else {
        return Ok(None);
    };
    let args = tuple(args).unwrap_or(&[]);
    match (module, func) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            rebuild_tensor(args, name, zip, prefix, big_endian).map(Some)
        }
        // A Parameter wraps its data tensor: (data, requires_grad, hooks[, state]).
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            let data = args
                .first()
                .with_context(|| format!("tensor {name}: empty parameter"))?;
            rebuild(data, name, zip, prefix, big_endian)
        }
        // A tensor subclass: (func, type, args, state); the data is func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let [func, _, inner, ..] = args else {
                bail!("tensor {name}: malformed _rebuild_from_type_v2");
            };
            let inner = Object::Reduce {
                callable: Box::new(func.clone()),
                args: Box::new(inner.clone()),
            };
            rebuild(&inner, name, zip, prefix, big_endian)
        }
        (m, f) if tensor_call(value) => {
            bail!("tensor {name}: unsupported tensor kind {m}.{f} (quantised or sparse?)")
        }
        _ => Ok(None),
    }
}

/// Element types of torch's typed storages.
#[derive(Clone, Copy, Debug)]
enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    fn from_storage(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Element `i` of `bytes` (which holds at least `i + 1` elements).
    fn get(self, bytes: &[u8], i: usize, big_endian: bool) -> f64 {
        let s = self.size();
        let mut b = [0u8; 8];
        b[..s].copy_from_slice(&bytes[i * s..(i + 1) * s]);
        if big_endian {
            b[..s].reverse();
        }
        match self {
            Self::F64 => f64::from_le_bytes(b),
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::F16 => super::weights::f16_to_f64(u16::from_le_bytes([b[0], b[1]])),
            Self::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64,
            Self::I64 => i64::from_le_bytes(b) as f64,
            Self::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Self::I8 => b[0] as i8 as f64,
            Self::U8 => b[0] as f64,
            Self::Bool => (b[0] != 0) as u8 as f64,
        }
    }
}

/// Largest ratio of a view's elements to its storage's that [`rebuild_tensor`] reads.
const MAX_VIEW_EXPANSION: usize = 64;

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])`,
/// where `storage` is the persistent id `("storage", <class>, key, location, numel)` of
/// `{prefix}data/{key}`. Offset and strides count elements.
fn rebuild_tensor(
    args: &[Object],
    name: &str,
    zip: &mut Zip,
    prefix: &str,
    big_endian: bool,
) -> anyhow::Result<HostTensor> {
    let malformed = || anyhow!("tensor {name}: malformed _rebuild_tensor arguments");
    let [storage, offset, size, stride, ..] = args else {
        return Err(malformed());
    };
    let Object::PersistentLoad(id) = storage else {
        return Err(malformed());
    };
    let id = tuple(id).ok_or_else(malformed)?;
    let (class, key) = match id {
        [Object::Unicode(tag), Object::Class { class_name, .. }, key, ..] if tag == "storage" => {
            let key = match key {
                Object::Unicode(s) => s.clone(),
                other => int(other).ok_or_else(malformed)?.to_string(),
            };
            (class_name.as_str(), key)
        }
        _ => return Err(malformed()),
    };
    let dtype = DType::from_storage(class)
        .with_context(|| format!("tensor {name}: unsupported dtype {class}"))?;
    let offset = int(offset)
        .and_then(|o| usize::try_from(o).ok())
        .ok_or_else(malformed)?;
    let shape = usizes(size).ok_or_else(malformed)?;
    let stride = usizes(stride).ok_or_else(malformed)?;
    if stride.len() != shape.len() {
        return Err(malformed());
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(malformed)?;
    if numel == 0 {
        return Ok(HostTensor::new(shape, Vec::new()));
    }
    let entry = format!("{prefix}data/{key}");
    let index = zip
        .find(&entry)
        .with_context(|| format!("tensor {name}: storage {entry} missing from the archive"))?;
    let bytes = zip.read(index)?;
    let available = bytes.len() / dtype.size();
    // The furthest element the view touches must lie inside the storage.
    let last = shape
        .iter()
        .zip(&stride)
        .try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
    match last {
        Some(last) if last < available => {}
        _ => bail!(
            "tensor {name}: view (offset {offset}, shape {shape:?}, stride {stride:?}) runs past \
             its storage of {available} elements"
        ),
    }
    // A view may repeat storage elements (stride 0, overlapping strides), but a state dict's
    // tensors never expand their storage by much: refuse before allocating a huge broadcast.
    if numel > available.max(1).saturating_mul(MAX_VIEW_EXPANSION) {
        bail!(
            "tensor {name}: view of {numel} elements (shape {shape:?}, stride {stride:?}) over a \
             storage of {available}: more than {MAX_VIEW_EXPANSION}x its storage, refused"
        );
    }
    let mut data = Vec::with_capacity(numel);
    let mut idx = vec![0usize; shape.len()];
    let mut pos = offset;
    for _ in 0..numel {
        data.push(dtype.get(&bytes, pos, big_endian));
        // Odometer over the multi-index, last axis fastest (row-major output).
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            pos += stride[ax];
            if idx[ax] < shape[ax] {
                break;
            }
            pos -= stride[ax] * shape[ax];
            idx[ax] = 0;
        }
    }
    Ok(HostTensor::new(shape, data))
}

/// One member of a zip archive, from the central directory.
struct ZipEntry {
    name: String,
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    local_offset: u64,
}

/// The members of a zip archive, read on demand.
struct Zip {
    file: File,
    len: u64,
    entries: Vec<ZipEntry>,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

const TRUNCATED: &str = "truncated or corrupt zip archive";

impl Zip {
    fn open(path: &Path) -> anyhow::Result<Self> {
        crate::io::check_regular(path)?;
        let file = File::open(path).map_err(|e| anyhow!("cannot open: {e}"))?;
        let len = file.metadata()?.len();
        if len == 0 {
            bail!("empty file");
        }
        let mut zip = Self {
            file,
            len,
            entries: Vec::new(),
        };
        let head = zip.read_at(0, len.min(4) as usize)?;
        // The end-of-central-directory record: 22 bytes plus a comment of up to 64 KiB.
        let tail_len = len.min(22 + 65535);
        let tail = zip.read_at(len - tail_len, tail_len as usize)?;
        let Some(eocd) = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        else {
            if head.starts_with(b"PK\x03\x04") {
                bail!("{TRUNCATED} (no end-of-archive record)");
            }
            if head.starts_with(&[0x80, 0x02, 0x8a]) {
                bail!("legacy (pre-1.6) torch.save format, not a zip archive; re-save it with a current torch");
            }
            bail!("not a zip archive, so not a torch.save checkpoint");
        };
        let eocd_pos = len - tail_len + eocd as u64;
        let e = &tail[eocd..];
        let (mut count, mut cd_size, mut cd_offset) = (
            u16_at(e, 10) as u64,
            u32_at(e, 12) as u64,
            u32_at(e, 16) as u64,
        );
        if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
            // zip64: a locator just before the record points at the zip64 end record.
            let loc = zip.read_at(eocd_pos.checked_sub(20).context(TRUNCATED)?, 20)?;
            if u32_at(&loc, 0) != 0x0706_4b50 {
                bail!("{TRUNCATED} (zip64 locator missing)");
            }
            let rec = zip.read_at(u64_at(&loc, 8), 56)?;
            if u32_at(&rec, 0) != 0x0606_4b50 {
                bail!("{TRUNCATED} (zip64 end record missing)");
            }
            (count, cd_size, cd_offset) = (u64_at(&rec, 32), u64_at(&rec, 40), u64_at(&rec, 48));
        }
        let cd = zip.read_at(cd_offset, usize::try_from(cd_size)?)?;
        let mut p = 0usize;
        for _ in 0..count {
            if p + 46 > cd.len() || u32_at(&cd, p) != 0x0201_4b50 {
                bail!("{TRUNCATED} (bad central directory)");
            }
            let (n, m, k) = (
                u16_at(&cd, p + 28) as usize,
                u16_at(&cd, p + 30) as usize,
                u16_at(&cd, p + 32) as usize,
            );
            if p + 46 + n + m + k > cd.len() {
                bail!("{TRUNCATED} (bad central directory)");
            }
            let mut entry = ZipEntry {
                name: String::from_utf8_lossy(&cd[p + 46..p + 46 + n]).into_owned(),
                method: u16_at(&cd, p + 10),
                crc: u32_at(&cd, p + 16),
                compressed: u32_at(&cd, p + 20) as u64,
                size: u32_at(&cd, p + 24) as u64,
                local_offset: u32_at(&cd, p + 42) as u64,
            };
            // zip64 extra field: 64-bit values for whichever 32-bit fields are saturated.
            let mut extra = &cd[p + 46 + n..p + 46 + n + m];
            while extra.len() >= 4 {
                let (id, sz) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
                let body = extra.get(4..4 + sz).context(TRUNCATED)?;
                if id == 1 {
                    let mut vals = body.chunks_exact(8).map(|c| u64_at(c, 0));
                    for field in [
                        &mut entry.size,
                        &mut entry.compressed,
                        &mut entry.local_offset,
                    ] {
                        if *field == 0xffff_ffff {
                            *field = vals.next().context(TRUNCATED)?;
                        }
                    }
                }
                extra = &extra[4 + sz..];
            }
            zip.entries.push(entry);
            p += 46 + n + m + k;
        }
        Ok(zip)
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }

    /// `len` bytes at `offset`, or an error if the file ends first.
    fn read_at(&mut self, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => {}
            _ => bail!("{TRUNCATED} (data runs past the end of the file)"),
        }
        let mut buf = vec![0u8; len];
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The uncompressed contents of entry `i`, checked against its CRC.
    fn read(&mut self, i: usize) -> anyhow::Result<Vec<u8>> {
        let e = &self.entries[i];
        let (name, method, crc, compressed, size, local) = (
            e.name.clone(),
            e.method,
            e.crc,
            e.compressed,
            e.size,
            e.local_offset,
        );
        let header = self.read_at(local, 30)?;
        if u32_at(&header, 0) != 0x0403_4b50 {
            bail!("{TRUNCATED} (bad local header for {name})");
        }
        let start = local + 30 + u16_at(&header, 26) as u64 + u16_at(&header, 28) as u64;
        // Deflate expands at most 1032:1: a larger claim is corrupt (or a zip bomb), refused
        // before anything is inflated.
        if method == 8 && size > compressed.saturating_mul(1032).saturating_add(1024) {
            bail!("{TRUNCATED} ({name} claims {size} bytes from {compressed} deflated bytes)");
        }
        let raw = self.read_at(start, usize::try_from(compressed)?)?;
        let data = match method {
            0 => raw,
            8 => {
                let mut out = Vec::new();
                flate2::read::DeflateDecoder::new(raw.as_slice())
                    .take(size)
                    .read_to_end(&mut out)
                    .map_err(|e| anyhow!("{TRUNCATED} (cannot inflate {name}: {e})"))?;
                out
            }
            m => bail!("zip member {name} uses unsupported compression method {m}"),
        };
        if data.len() as u64 != size {
            bail!(
                "{TRUNCATED} ({name} has {} bytes, expected {size})",
                data.len()
            );
        }
        let mut c = flate2::Crc::new();
        c.update(&data);
        if c.sum() != crc {
            bail!("{TRUNCATED} (CRC mismatch in {name})");
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MNIST: &str = "../shared/reference/mnist-mlp/model_epoch_12.pt";
    const MODADD: &str = "../shared/reference/modadd/seed0/model_epoch_60000.pt";

    /// A zip archive of stored (uncompressed) members, written by hand.
    fn zip_stored(members: &[(String, Vec<u8>)]) -> Vec<u8> {
        let (mut out, mut central) = (Vec::new(), Vec::new());
        for (name, data) in members {
            let mut crc = flate2::Crc::new();
            crc.update(data);
            let offset = out.len() as u32;
            let mut common = Vec::new();
            common.extend(20u16.to_le_bytes()); // version needed
            common.extend(0u16.to_le_bytes()); // flags
            common.extend(0u16.to_le_bytes()); // method: stored
            common.extend(0u32.to_le_bytes()); // time, date
            common.extend(crc.sum().to_le_bytes());
            common.extend((data.len() as u32).to_le_bytes());
            common.extend((data.len() as u32).to_le_bytes());
            common.extend((name.len() as u16).to_le_bytes());
            common.extend(0u16.to_le_bytes()); // extra length
            out.extend(0x0403_4b50u32.to_le_bytes());
            out.extend(&common);
            out.extend(name.as_bytes());
            out.extend(data);
            central.extend(0x0201_4b50u32.to_le_bytes());
            central.extend(20u16.to_le_bytes()); // version made by
            central.extend(&common);
            central.extend([0u8; 10]); // comment length, disk, attributes
            central.extend(offset.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend(&central);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(cd_offset.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    /// Pickle protocol 2, written opcode by opcode.
    #[derive(Default)]
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn op(&mut self, b: u8) -> &mut Self {
            self.0.push(b);
            self
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.0.push(b'c');
            self.0.extend(format!("{module}\n{name}\n").as_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend((s.len() as u32).to_le_bytes());
            self.0.extend(s.as_bytes());
            self
        }
        fn int(&mut self, i: i32) -> &mut Self {
            self.0.push(b'J');
            self.0.extend(i.to_le_bytes());
            self
        }
        fn ints(&mut self, v: &[i32]) -> &mut Self {
            self.op(b'(');
            for &i in v {
                self.int(i);
            }
            self.op(b't')
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
        fn tensor(
            &mut self,
            class: &str,
            key: &str,
            offset: i32,
            size: &[i32],
            stride: &[i32],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
            self.op(b'(').str("storage").global("torch", class).str(key);
            self.str("cpu").int(99).op(b't').op(b'Q');
            self.int(offset).ints(size).ints(stride).op(0x89);
            self.global("collections", "OrderedDict").op(b')').op(b'R');
            self.op(b't').op(b'R')
        }
    }

    /// Writes a checkpoint holding the pickle `pkl` and storages `(key, bytes)`.
    fn write_pt(dir: &Path, file: &str, pkl: &Pickle, storages: &[(&str, Vec<u8>)]) -> PathBuf {
        let mut members = vec![
            ("archive/data.pkl".to_string(), pkl.0.clone()),
            ("archive/byteorder".to_string(), b"little".to_vec()),
        ];
        for (k, b) in storages {
            members.push((format!("archive/data/{k}"), b.clone()));
        }
        let path = dir.join(file);
        std::fs::write(&path, zip_stored(&members)).unwrap();
        path
    }

    use std::path::PathBuf;

    fn storages() -> Vec<(&'static str, Vec<u8>)> {
        let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let f64s: Vec<u8> = [7.0f64, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let i64s: Vec<u8> = [-7i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        vec![
            ("0", f32s),
            ("1", vec![1, 0, 1, 1]),
            ("2", f64s),
            ("3", i64s),
        ]
    }

    /// An OrderedDict of views covering strides, offsets, dtypes and a Parameter wrapper.
    fn views_pickle(p: &mut Pickle) {
        p.global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(b'(');
        // A transposed view of the row-major [2, 3] matrix 0..6.
        p.str("t").tensor("FloatStorage", "0", 0, &[3, 2], &[1, 3]);
        // Every other element from offset 1.
        p.str("o").tensor("FloatStorage", "0", 1, &[2], &[2]);
        p.str("m").tensor("BoolStorage", "1", 0, &[2, 2], &[2, 1]);
        // A scalar at offset 1.
        p.str("s").tensor("DoubleStorage", "2", 1, &[], &[]);
        p.str("l")
            .global("torch._utils", "_rebuild_parameter")
            .op(b'(');
        p.tensor("LongStorage", "3", 0, &[2], &[1]);
        p.op(0x89)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R');
        p.op(b't').op(b'R');
        p.op(b'u');
    }

    fn check_views(t: &BTreeMap<String, HostTensor>) {
        assert_eq!(
            t["t"],
            HostTensor::new(vec![3, 2], vec![0., 3., 1., 4., 2., 5.])
        );
        assert_eq!(t["o"], HostTensor::new(vec![2], vec![1., 3.]));
        assert_eq!(t["m"], HostTensor::new(vec![2, 2], vec![1., 0., 1., 1.]));
        assert_eq!(t["s"], HostTensor::new(vec![], vec![2.5]));
        assert_eq!(t["l"], HostTensor::new(vec![2], vec![-7., 9.]));
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn hand_written_views_offsets_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Pickle::default();
        p.op(0x80).op(2);
        views_pickle(&mut p);
        // torch's `_metadata` attribute, set by BUILD: not a tensor, skipped.
        p.op(b'}')
            .str("_metadata")
            .op(b'}')
            .op(b's')
            .op(b'b')
            .op(b'.');
        let path = write_pt(dir.path(), "views.pt", &p, &storages());
        check_views(&load_pt(&path).unwrap());
    }

    #[test]
    fn nested_state_dict_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Pickle::default();
        p.op(0x80).op(2).op(b'}').op(b'(');
        p.str("epoch").int(3);
        p.str("model");
        views_pickle(&mut p);
        p.op(b'u').op(b'.');
        let path = write_pt(dir.path(), "nested.pt", &p, &storages());
        check_views(&load_pt(&path).unwrap());
    }

    #[test]
    fn bad_checkpoints_are_one_line_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = |path: &Path| {
            let e = load_pt(path).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(!e.contains('\n'), "{e}");
            e
        };
        // A stride-0 broadcast of 10^9 elements over a 6-element storage: refused before
        // the 8 GB allocation.
        let mut p = Pickle::default();
        p.op(0x80).op(2).op(b'}').op(b'(').str("w");
        p.tensor("FloatStorage", "0", 0, &[1_000_000_000], &[0]);
        p.op(b'u').op(b'.');
        let broadcast = write_pt(dir.path(), "broadcast.pt", &p, &storages());
        assert!(err(&broadcast).contains("more than 64x its storage"));

        let missing = dir.path().join("missing.pt");
        assert!(err(&missing).contains("cannot read"));

        let text = dir.path().join("text.pt");
        std::fs::write(&text, "hello, this is not a checkpoint at all").unwrap();
        assert!(err(&text).contains("not a zip"));

        let mut p = Pickle::default();
        p.op(0x80)
            .op(2)
            .op(b'}')
            .op(b'(')
            .str("a")
            .int(1)
            .op(b'u')
            .op(b'.');
        let not_sd = write_pt(dir.path(), "dict.pt", &p, &[]);
        assert!(err(&not_sd).contains("not a state dict"));

        let mut p = Pickle::default();
        p.op(0x80).op(2).op(b']').op(b'.');
        let list = write_pt(dir.path(), "list.pt", &p, &[]);
        assert!(err(&list).contains("not a state dict"));

        let mut p = Pickle::default();
        p.op(0x80).op(2).op(b'}').op(b'(').str("c");
        p.tensor("ComplexFloatStorage", "0", 0, &[1], &[1]);
        p.op(b'u').op(b'.');
        let complex = write_pt(dir.path(), "complex.pt", &p, &[("0", vec![0; 8])]);
        assert!(err(&complex).contains("unsupported dtype ComplexFloatStorage"));

        let mut p = Pickle::default();
        p.op(0x80).op(2).op(b'}').op(b'(').str("big");
        p.tensor("FloatStorage", "0", 4, &[2, 2], &[2, 1]);
        p.op(b'u').op(b'.');
        let past = write_pt(dir.path(), "past.pt", &p, &[("0", vec![0; 24])]);
        assert!(err(&past).contains("runs past"));

        let mut p = Pickle::default();
        p.op(0x80).op(2).op(b'}').op(b'(').str("a");
        let cut = write_pt(dir.path(), "cut-pickle.pt", &p, &[]);
        assert!(err(&cut).contains("cannot parse data.pkl"));
    }

    #[test]
    #[ignore = "needs the published checkpoints in ../shared/reference"]
    fn truncated_reference_checkpoint_is_an_error() {
        let bytes = std::fs::read(MNIST).unwrap_or_else(|e| {
            panic!("{MNIST}: {e} (the published checkpoints live in ../shared/reference)")
        });
        let dir = tempfile::tempdir().unwrap();
        for keep in [bytes.len() - 10, bytes.len() / 2, 100, 0] {
            let path = dir.path().join(format!("cut{keep}.pt"));
            std::fs::write(&path, &bytes[..keep]).unwrap();
            let e = load_pt(&path).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        // A flipped byte inside a storage is caught by the CRC.
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let path = dir.path().join("flipped.pt");
        std::fs::write(&path, &bad).unwrap();
        assert!(load_pt(&path).unwrap_err().to_string().contains("CRC"));
    }

    #[test]
    #[ignore = "needs the published checkpoints in ../shared/reference"]
    fn mnist_reference_checkpoint() {
        assert!(
            Path::new(MNIST).exists(),
            "{MNIST} not found (the published checkpoints live in ../shared/reference)"
        );
        let t = load_pt(Path::new(MNIST)).unwrap();
        let keys: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "layers.0.W",
                "layers.0.b",
                "layers.1.W",
                "layers.1.b",
                "layers.2.W",
                "layers.2.b"
            ]
        );
        for (name, shape) in [
            ("layers.0.W", vec![784, 100]),
            ("layers.0.b", vec![100]),
            ("layers.1.W", vec![100, 100]),
            ("layers.1.b", vec![100]),
            ("layers.2.W", vec![100, 10]),
            ("layers.2.b", vec![10]),
        ] {
            assert_eq!(t[name].shape, shape, "{name}");
            assert!(t[name].data.iter().all(|v| v.is_finite()), "{name}");
        }
        // Values read independently (Python zipfile + struct on the raw f32 storages).
        let w0 = &t["layers.0.W"].data;
        assert_eq!(w0[0], -0.000_267_386_436_462_402_34);
        assert_eq!(w0[5 * 100 + 7], 0.014_615_472_406_148_91);
        assert_eq!(w0[78399], 0.001_986_248_185_858_130_5);
        assert_eq!(t["layers.2.b"].data[3], -0.222_530_156_373_977_66);
    }

    #[test]
    #[ignore = "needs the published checkpoints in ../shared/reference"]
    fn modadd_reference_checkpoint() {
        assert!(
            Path::new(MODADD).exists(),
            "{MODADD} not found (the published checkpoints live in ../shared/reference)"
        );
        let t = load_pt(Path::new(MODADD)).unwrap();
        for (name, shape) in [
            ("embed.W_E", vec![114, 128]),
            ("pos_embed.W_pos", vec![3, 128]),
            ("blocks.0.attn.W_Q", vec![4, 128, 32]),
            ("blocks.0.attn.W_K", vec![4, 128, 32]),
            ("blocks.0.attn.W_V", vec![4, 128, 32]),
            ("blocks.0.attn.W_O", vec![4, 32, 128]),
            ("blocks.0.attn.b_Q", vec![4, 32]),
            ("blocks.0.attn.b_K", vec![4, 32]),
            ("blocks.0.attn.b_V", vec![4, 32]),
            ("blocks.0.attn.b_O", vec![128]),
            ("blocks.0.attn.mask", vec![3, 3]),
            ("blocks.0.attn.IGNORE", vec![]),
            ("blocks.0.mlp.W_in", vec![128, 512]),
            ("blocks.0.mlp.b_in", vec![512]),
            ("blocks.0.mlp.W_out", vec![512, 128]),
            ("blocks.0.mlp.b_out", vec![128]),
            ("unembed.W_U", vec![128, 114]),
            ("unembed.b_U", vec![114]),
        ] {
            let x = t.get(name).unwrap_or_else(|| panic!("missing {name}"));
            assert_eq!(x.shape, shape, "{name}");
            if name != "blocks.0.attn.IGNORE" {
                assert!(x.data.iter().all(|v| v.is_finite()), "{name}");
            }
        }
        assert_eq!(t.len(), 18);
        assert_eq!(
            t["blocks.0.attn.mask"].data,
            [1., 0., 0., 1., 1., 0., 1., 1., 1.]
        );
        assert_eq!(t["blocks.0.attn.IGNORE"].data, [f64::NEG_INFINITY]);
        assert_eq!(
            t["embed.W_E"].data[113 * 128 + 127],
            -0.064_464_427_530_765_53
        );
    }
}
