//! GGUF files (llama.cpp's model format): a reader with dequantisation to f64, a writer (used by
//! tests to build tiny models), and the mapping of a `llama` GGUF onto Hugging Face
//! `LlamaForCausalLM` tensor names, layout and config.
//!
//! Hand-written rather than taken from a crate: the format is small, and we need exact control over
//! dequantisation (the ggml reference formulas, bit for bit) and over errors (a truncated or corrupt
//! file gives one line naming the file and the metadata key or tensor, never a panic).
//!
//! # Format
//! Versions 3 and 2 (identical apart from the version number; version 1 used 32-bit counts and is
//! rejected). All numbers little-endian.
//! - Header: magic `GGUF`, version `u32`, tensor count `u64`, metadata count `u64`.
//! - Metadata: key/value pairs, each a key (string), a value type (`u32`) and the value. A string
//!   is a `u64` byte length and UTF-8 bytes. Value types: 0 `u8`, 1 `i8`, 2 `u16`, 3 `i16`,
//!   4 `u32`, 5 `i32`, 6 `f32`, 7 `bool` (one byte, 0 or 1), 8 string, 9 array (element type
//!   `u32`, count `u64`, the elements; arrays may nest), 10 `u64`, 11 `i64`, 12 `f64`.
//! - Tensor infos: name (string), `n_dims` (`u32`, 1 to 4), `ne[0..n_dims]` (`u64` each, `ne[0]`
//!   the fastest-varying, contiguous dimension), ggml type (`u32`), offset (`u64`, relative to the
//!   data section, a multiple of the alignment).
//! - Zero padding up to a multiple of `general.alignment` (`u32` metadata, default 32), then the
//!   data section.
//!
//! # Tensor layout and types
//! A tensor with `ne = [n0, n1, ...]` is stored as rows of `n0` elements. [`Gguf::tensor`] returns
//! it row-major with the dims reversed, `[..., n1, n0]`: a ggml matrix `ne = [in, out]` becomes
//! `[out, in]`, the layout of a PyTorch `nn.Linear.weight`. Element types read: F32, F16, BF16,
//! F64 and the block-quantised types below, whose rows are cut in blocks of 32 elements:
//! - Q8_0, 34 bytes: f16 scale `d`, 32 × `i8` `q`; `x = d q`.
//! - Q4_0, 18 bytes: f16 `d`, 16 bytes whose low nibbles are elements 0..16 and high nibbles
//!   elements 16..32; `x = d (q - 8)`.
//! - Q4_1, 20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles as in Q4_0; `x = d q + m`.
//!
//! Other types (the K-quants such as Q6_K, the IQ types, ...) are listed in the file but cannot be
//! dequantised: asking for such a tensor is an error naming it and its type.

use super::weights::{f16_to_f64, Tensors};
use crate::tensor::HostTensor;
use anyhow::{anyhow, bail, ensure, Context};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (real files nest at most once).
const MAX_NESTING: usize = 8;
/// Largest `llama.context_length` accepted (as Hugging Face configs' positions, 2^24).
const MAX_CONTEXT: usize = 1 << 24;
/// Elements per block of the quantised types supported here.
const QK: usize = 32;

/// The type of a metadata value (GGUF's `gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Fewest bytes a value of this type occupies in the file (to reject absurd array counts
    /// before allocating).
    fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// The element type (kept so that empty arrays round-trip) and the elements, all of that type.
    Array(GgufValueType, Vec<GgufValue>),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        use GgufValueType as T;
        match self {
            GgufValue::U8(_) => T::U8,
            GgufValue::I8(_) => T::I8,
            GgufValue::U16(_) => T::U16,
            GgufValue::I16(_) => T::I16,
            GgufValue::U32(_) => T::U32,
            GgufValue::I32(_) => T::I32,
            GgufValue::U64(_) => T::U64,
            GgufValue::I64(_) => T::I64,
            GgufValue::F32(_) => T::F32,
            GgufValue::F64(_) => T::F64,
            GgufValue::Bool(_) => T::Bool,
            GgufValue::String(_) => T::String,
            GgufValue::Array(..) => T::Array,
        }
    }

    /// The type for error messages, e.g. `u32` or `array of string`.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(t, _) => format!("array of {}", t.name()),
            v => v.value_type().name().to_string(),
        }
    }

    /// An array of strings.
    pub fn string_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        GgufValue::Array(
            GgufValueType::String,
            items
                .into_iter()
                .map(|s| GgufValue::String(s.into()))
                .collect(),
        )
    }

    /// Any integer value that is non-negative, as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v as i64),
            GgufValue::U16(v) => Some(v as i64),
            GgufValue::U32(v) => Some(v as i64),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float or integer value as `f64`. An `f32` becomes the `f64` of its shortest decimal
    /// spelling, which recovers the decimal the writer started from: `1e-5f32` gives `1e-5`, not
    /// `9.999999747378752e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F64(v) => Some(v),
            GgufValue::F32(v) => Some(f32_to_f64_decimal(v)),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
}

/// The `f64` of the shortest decimal that round-trips to `v`.
fn f32_to_f64_decimal(v: f32) -> f64 {
    if v.is_finite() {
        v.to_string().parse().unwrap_or(v as f64)
    } else {
        v as f64
    }
}

/// The element type of a tensor (ggml's `ggml_type`). Tensors of any type can be listed; those of
/// the named types can be dequantised and written, those of [`GgufType::Other`] cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    F64,
    Q8_0,
    Q4_0,
    Q4_1,
    /// Any other ggml type id.
    Other(u32),
}

impl GgufType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgufType::F32,
            1 => GgufType::F16,
            2 => GgufType::Q4_0,
            3 => GgufType::Q4_1,
            8 => GgufType::Q8_0,
            28 => GgufType::F64,
            30 => GgufType::BF16,
            other => GgufType::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 8,
            GgufType::F64 => 28,
            GgufType::BF16 => 30,
            GgufType::Other(id) => id,
        }
    }

    /// ggml's name of the type, e.g. `Q6_K`.
    pub fn name(self) -> String {
        let known = match self.id() {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            id => return format!("ggml type {id}"),
        };
        known.to_string()
    }

    /// `(elements per block, bytes per block)` where known, for every type (supported or not) so
    /// that truncated files are caught when they are opened.
    fn block(self) -> Option<(u64, u64)> {
        Some(match self.id() {
            0 => (1, 4),
            1 | 30 => (1, 2),
            28 => (1, 8),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            _ => return None,
        })
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Where a tensor lies in the file and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml's `ne`: `dims[0]` is the fastest-varying dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgufType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape: the dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (None on overflow).
    pub fn n_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes of data, where the type's block layout is known (None for unknown types, rows that
    /// are not a whole number of blocks, or overflow).
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = self.ggml_type.block()?;
        let n0 = *self.dims.first()?;
        if !n0.is_multiple_of(block) {
            return None;
        }
        let rows = self.dims[1..]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        (n0 / block).checked_mul(size)?.checked_mul(rows)
    }
}

/// A parsed GGUF file: its metadata, its tensor list, and its bytes (tensors are dequantised on
/// demand by [`Gguf::tensor`]).
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// The file's name, used in error messages.
    pub file: String,
    bytes: Vec<u8>,
    data_start: usize,
    index: BTreeMap<String, usize>,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("file", &self.file)
            .field("version", &self.version)
            .field("metadata keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

/// Reads and parses a GGUF file (the whole file is read into memory; tensors are dequantised on
/// demand). Errors are one line starting with the path.
pub fn read_gguf(path: &Path) -> anyhow::Result<Gguf> {
    let bytes = crate::io::read_file(path)?;
    parse_gguf(bytes, &path.display().to_string())
}

/// Parses the bytes of a GGUF file; `file` names it in error messages.
pub fn parse_gguf(bytes: Vec<u8>, file: &str) -> anyhow::Result<Gguf> {
    parse_inner(bytes, file).map_err(|e| anyhow!("{file}: {e:#}"))
}

fn parse_inner(bytes: Vec<u8>, file: &str) -> anyhow::Result<Gguf> {
    let mut r = Reader { b: &bytes, pos: 0 };
    let magic = r
        .take(4)
        .context("not a GGUF file (shorter than its magic)")?;
    if magic != MAGIC {
        bail!(
            "not a GGUF file: starts with {:?}, expected \"GGUF\"",
            String::from_utf8_lossy(magic)
        );
    }
    let version = r.u32().context("header")?;
    if version != 2 && version != 3 {
        bail!("GGUF version {version} is not supported (only 2 and 3)");
    }
    let n_tensors = r.u64().context("header")?;
    let n_kv = r.u64().context("header")?;
    // Each entry takes at least 8 (name) + 4 bytes, each tensor info 8 + 4 + 8 + 4 + 8.
    r.check_count(n_kv, 12, "metadata entries")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r
            .string()
            .with_context(|| format!("key of metadata entry #{i}"))?;
        let value = r
            .value_with_type(0)
            .with_context(|| format!("metadata key `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("metadata key `{key}` appears twice");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => {
            bail!("metadata key `general.alignment` must be a power of two of type u32, got {v:?}")
        }
    };
    r.check_count(n_tensors, 32, "tensor infos")?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut index = BTreeMap::new();
    for i in 0..n_tensors {
        let info = r
            .tensor_info(alignment)
            .with_context(|| format!("tensor info #{i}"))?;
        if index.insert(info.name.clone(), tensors.len()).is_some() {
            bail!("tensor `{}` appears twice", info.name);
        }
        tensors.push(info);
    }
    let data_start = align_up(r.pos as u64, alignment)
        .and_then(|s| usize::try_from(s).ok())
        .context("data section offset overflows")?;
    let len = bytes.len() as u64;
    for t in &tensors {
        // Types of unknown layout cannot be checked here; they cannot be dequantised either.
        let Some(n) = t.n_bytes() else {
            if t.ggml_type.block().is_some() {
                bail!(
                    "tensor `{}` ({}, dims {:?}): rows of {} elements are not a whole number \
                     of blocks, or its size overflows",
                    t.name,
                    t.ggml_type,
                    t.dims,
                    t.dims[0]
                );
            }
            continue;
        };
        let end = (data_start as u64)
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(n));
        match end {
            Some(end) if end <= len => {}
            _ => bail!(
                "tensor `{}` ({}, dims {:?}) needs {n} bytes at data offset {}, past the end of \
                 the file ({len} bytes): the file is truncated or corrupt",
                t.name,
                t.ggml_type,
                t.dims,
                t.offset
            ),
        }
    }
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        file: file.to_string(),
        bytes,
        data_start,
        index,
    })
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? / a * a)
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let left = self.b.len() - self.pos;
        if n > left {
            bail!(
                "unexpected end of file at byte {}: {n} bytes needed, {left} left (truncated file?)",
                self.pos
            );
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in the rest of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> anyhow::Result<()> {
        let left = (self.b.len() - self.pos) as u64;
        if count.checked_mul(min_size).is_none_or(|n| n > left) {
            bail!(
                "{count} {what} cannot fit in the {left} bytes left at byte {} (corrupt or \
                 truncated file)",
                self.pos
            );
        }
        Ok(())
    }

    fn string(&mut self) -> anyhow::Result<String> {
        let n = self.u64()?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len() - self.pos)
            .with_context(|| {
                format!(
                    "string of {n} bytes at byte {} runs past the end of the file",
                    self.pos - 8
                )
            })?;
        let start = self.pos;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| anyhow!("string at byte {start} is not valid UTF-8"))
    }

    fn value_with_type(&mut self, depth: usize) -> anyhow::Result<GgufValue> {
        let id = self.u32()?;
        let t = GgufValueType::from_id(id).with_context(|| format!("unknown value type {id}"))?;
        self.value(t, depth)
    }

    fn value(&mut self, t: GgufValueType, depth: usize) -> anyhow::Result<GgufValue> {
        use GgufValueType as T;
        Ok(match t {
            T::U8 => GgufValue::U8(self.take(1)?[0]),
            T::I8 => GgufValue::I8(self.take(1)?[0] as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            T::U32 => GgufValue::U32(self.u32()?),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            T::U64 => GgufValue::U64(self.u64()?),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            T::Bool => match self.take(1)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => bail!("bool at byte {} is {b}, not 0 or 1", self.pos - 1),
            },
            T::String => GgufValue::String(self.string()?),
            T::Array => {
                if depth >= MAX_NESTING {
                    bail!("arrays nested more than {MAX_NESTING} deep");
                }
                let id = self.u32()?;
                let et = GgufValueType::from_id(id)
                    .with_context(|| format!("array of unknown value type {id}"))?;
                let n = self.u64()?;
                self.check_count(n, et.min_size(), &format!("{} array elements", et.name()))?;
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    items.push(
                        self.value(et, depth + 1)
                            .with_context(|| format!("array element #{i}"))?,
                    );
                }
                GgufValue::Array(et, items)
            }
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> anyhow::Result<GgufTensorInfo> {
        let name = self.string().context("name")?;
        let n_dims = self.u32().with_context(|| format!("tensor `{name}`"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("tensor `{name}` has {n_dims} dims, expected 1 to {MAX_DIMS}");
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(self.u64().with_context(|| format!("tensor `{name}`"))?);
        }
        let ggml_type = GgufType::from_id(self.u32().with_context(|| format!("tensor `{name}`"))?);
        let offset = self.u64().with_context(|| format!("tensor `{name}`"))?;
        if !offset.is_multiple_of(alignment) {
            bail!(
                "tensor `{name}` has offset {offset}, not a multiple of the alignment {alignment}"
            );
        }
        let info = GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        };
        if info
            .n_elements()
            .is_none_or(|n| usize::try_from(n).is_err())
        {
            bail!(
                "tensor `{}` has dims {:?}: too many elements",
                info.name,
                info.dims
            );
        }
        Ok(info)
    }
}

/// Typed access to metadata. Errors name the key but not the file (see [`Gguf::meta`]).
#[derive(Clone, Copy)]
pub struct GgufMeta<'a>(pub &'a BTreeMap<String, GgufValue>);

impl<'a> GgufMeta<'a> {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a GgufValue> {
        self.0.get(key)
    }

    fn require(&self, key: &str) -> anyhow::Result<&'a GgufValue> {
        self.0
            .get(key)
            .with_context(|| format!("metadata key `{key}` missing"))
    }

    fn typed<T>(
        &self,
        key: &str,
        expected: &str,
        conv: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> anyhow::Result<T> {
        let v = self.require(key)?;
        conv(v).ok_or_else(|| {
            anyhow!(
                "metadata key `{key}` has type {}, expected {expected}",
                v.type_name()
            )
        })
    }

    /// A non-negative integer (of any integer type).
    pub fn u64(&self, key: &str) -> anyhow::Result<u64> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// A non-negative integer that fits a `usize`.
    pub fn usize(&self, key: &str) -> anyhow::Result<usize> {
        let v = self.u64(key)?;
        usize::try_from(v).map_err(|_| anyhow!("metadata key `{key}` = {v} is too large"))
    }

    /// An integer (of any integer type) that fits an `i64`.
    pub fn i64(&self, key: &str) -> anyhow::Result<i64> {
        self.typed(key, "an integer", GgufValue::as_i64)
    }

    /// A number (float or integer); see [`GgufValue::as_f64`] for `f32` values.
    pub fn f64(&self, key: &str) -> anyhow::Result<f64> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    pub fn bool(&self, key: &str) -> anyhow::Result<bool> {
        self.typed(key, "bool", |v| match v {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        })
    }

    pub fn str(&self, key: &str) -> anyhow::Result<&'a str> {
        self.typed(key, "string", |v| match v {
            GgufValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// An array of strings.
    pub fn str_array(&self, key: &str) -> anyhow::Result<Vec<&'a str>> {
        self.typed(key, "array of string", |v| match v {
            GgufValue::Array(_, items) => items
                .iter()
                .map(|s| match s {
                    GgufValue::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        })
    }

    /// An array of integers (of any integer type, each fitting an `i64`).
    pub fn i64_array(&self, key: &str) -> anyhow::Result<Vec<i64>> {
        self.typed(key, "array of integers", |v| match v {
            GgufValue::Array(_, items) => items.iter().map(GgufValue::as_i64).collect(),
            _ => None,
        })
    }

    /// An array of numbers (floats or integers).
    pub fn f64_array(&self, key: &str) -> anyhow::Result<Vec<f64>> {
        self.typed(key, "array of numbers", |v| match v {
            GgufValue::Array(_, items) => items.iter().map(GgufValue::as_f64).collect(),
            _ => None,
        })
    }

    /// `Ok(None)` when `key` is absent, else `get(key)` (which may fail on a wrong type).
    pub fn opt<T>(
        &self,
        key: &str,
        get: impl FnOnce(&Self, &str) -> anyhow::Result<T>,
    ) -> anyhow::Result<Option<T>> {
        if self.0.contains_key(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Gguf {
    /// Typed metadata access whose errors do not name the file (for callers that prefix it).
    pub fn meta(&self) -> GgufMeta<'_> {
        GgufMeta(&self.metadata)
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn named<T>(&self, r: anyhow::Result<T>) -> anyhow::Result<T> {
        r.map_err(|e| anyhow!("{}: {e:#}", self.file))
    }

    /// A non-negative integer (of any integer type).
    pub fn get_u64(&self, key: &str) -> anyhow::Result<u64> {
        self.named(self.meta().u64(key))
    }

    /// A non-negative integer that fits a `usize`.
    pub fn get_usize(&self, key: &str) -> anyhow::Result<usize> {
        self.named(self.meta().usize(key))
    }

    /// An integer (of any integer type) that fits an `i64`.
    pub fn get_i64(&self, key: &str) -> anyhow::Result<i64> {
        self.named(self.meta().i64(key))
    }

    /// A number (float or integer); see [`GgufValue::as_f64`] for `f32` values.
    pub fn get_f64(&self, key: &str) -> anyhow::Result<f64> {
        self.named(self.meta().f64(key))
    }

    pub fn get_bool(&self, key: &str) -> anyhow::Result<bool> {
        self.named(self.meta().bool(key))
    }

    pub fn get_str(&self, key: &str) -> anyhow::Result<&str> {
        self.named(self.meta().str(key))
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> anyhow::Result<Vec<&str>> {
        self.named(self.meta().str_array(key))
    }

    /// An array of integers.
    pub fn get_i64_array(&self, key: &str) -> anyhow::Result<Vec<i64>> {
        self.named(self.meta().i64_array(key))
    }

    /// An array of numbers.
    pub fn get_f64_array(&self, key: &str) -> anyhow::Result<Vec<f64>> {
        self.named(self.meta().f64_array(key))
    }

    /// The listing of tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Tensor `name` dequantised to f64, row-major with the dims reversed (see the module docs).
    pub fn tensor(&self, name: &str) -> anyhow::Result<HostTensor> {
        self.named(self.tensor_unnamed(name))
    }

    /// [`Gguf::tensor`] with errors that do not name the file.
    fn tensor_unnamed(&self, name: &str) -> anyhow::Result<HostTensor> {
        let info = self
            .tensor_info(name)
            .with_context(|| format!("no tensor `{name}`"))?;
        self.dequantize(info)
            .with_context(|| format!("tensor `{name}` ({})", info.ggml_type))
    }

    /// Every tensor, dequantised (see [`Gguf::tensor`]).
    pub fn tensors(&self) -> anyhow::Result<Tensors> {
        self.tensors
            .par_iter()
            .map(|t| Ok((t.name.clone(), self.tensor(&t.name)?)))
            .collect()
    }

    fn dequantize(&self, info: &GgufTensorInfo) -> anyhow::Result<HostTensor> {
        let t = info.ggml_type;
        if let GgufType::Other(_) = t {
            bail!("ggml type {t} cannot be dequantised (supported: F32, F16, BF16, F64, Q8_0, Q4_0, Q4_1)");
        }
        let n = info.n_elements().context("too many elements")? as usize;
        let n_bytes = info.n_bytes().with_context(|| {
            format!(
                "rows of {} elements are not a whole number of {t} blocks",
                info.dims[0]
            )
        })? as usize;
        let start = (self.data_start as u64)
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .context("offset overflows")?;
        let bytes = start
            .checked_add(n_bytes)
            .and_then(|end| self.bytes.get(start..end))
            .with_context(|| {
                format!(
                    "needs {n_bytes} bytes at byte {start}, past the end of the file ({} bytes)",
                    self.bytes.len()
                )
            })?;
        let data = dequantize_bytes(t, bytes, n);
        Ok(HostTensor::new(info.shape(), data))
    }
}

fn f16_at(b: &[u8], i: usize) -> f64 {
    f16_to_f64(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Decodes `n` elements of type `t` from `bytes` (whose length the caller checked).
fn dequantize_bytes(t: GgufType, bytes: &[u8], n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    match t {
        GgufType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64),
        ),
        GgufType::F64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap())),
        ),
        GgufType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgufType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64),
        ),
        GgufType::Q8_0 => {
            for b in bytes.chunks_exact(2 + QK) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f64));
            }
        }
        GgufType::Q4_0 => {
            for b in bytes.chunks_exact(2 + QK / 2) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as f64 - 8.0)));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as f64 - 8.0)));
            }
        }
        GgufType::Q4_1 => {
            for b in bytes.chunks_exact(4 + QK / 2) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f64 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f64 + m));
            }
        }
        GgufType::Other(_) => unreachable!("checked by the caller"),
    }
    debug_assert_eq!(out.len(), n);
    out
}

// ---------------------------------------------------------------------------------------------
// Writing

/// IEEE half of `x`, rounded to nearest, ties to even (overflow gives infinity).
pub fn f64_to_f16(x: f64) -> u16 {
    let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
    if x.is_nan() {
        return 0x7e00;
    }
    let a = x.abs();
    if a < 2f64.powi(-14) {
        // Subnormal (or zero): units of 2^-24; 1024 units is the smallest normal, 0x0400.
        return sign | (a * 2f64.powi(24)).round_ties_even() as u16;
    }
    if a >= 65520.0 {
        // At or past the midpoint between the largest half (65504) and 2^16.
        return sign | 0x7c00;
    }
    let e = ((a.to_bits() >> 52) & 0x7ff) as i32 - 1023; // -14..=15
    let m = (a * 2f64.powi(10 - e)).round_ties_even() as u32 - 1024; // 0..=1024, exact scaling
    let bits = (((e + 15) as u32) << 10) + m; // m = 1024 carries into the exponent
    sign | bits.min(0x7c00) as u16
}

/// bfloat16 of `x` (through f32), rounded to nearest, ties to even.
pub fn f64_to_bf16(x: f64) -> u16 {
    let f = x as f32;
    if f.is_nan() {
        return 0x7fc0 | ((f.to_bits() >> 16) as u16 & 0x8000);
    }
    let b = f.to_bits();
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// Encodes `x` (a whole number of 32-element blocks for the quantised types) as type `t`, with
/// the ggml reference quantisers (`quantize_row_*_ref`, computed in f32 like ggml):
/// - Q8_0: `d = amax / 127`, `q = round(x / d)`;
/// - Q4_0: `d = max / -8` where `max` is the value of largest magnitude (sign kept),
///   `q = min(15, trunc(x / d + 8.5))`;
/// - Q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize(t: GgufType, x: &[f64]) -> anyhow::Result<Vec<u8>> {
    let blocks = |t: GgufType| -> anyhow::Result<std::slice::ChunksExact<'_, f64>> {
        ensure!(
            x.len().is_multiple_of(QK),
            "{} values are not a whole number of {t} blocks of {QK}",
            x.len()
        );
        Ok(x.chunks_exact(QK))
    };
    let f16 = |v: f32| f64_to_f16(v as f64).to_le_bytes();
    let mut out = Vec::new();
    match t {
        GgufType::F32 => out.extend(x.iter().flat_map(|&v| (v as f32).to_le_bytes())),
        GgufType::F64 => out.extend(x.iter().flat_map(|&v| v.to_le_bytes())),
        GgufType::F16 => out.extend(x.iter().flat_map(|&v| f64_to_f16(v).to_le_bytes())),
        GgufType::BF16 => out.extend(x.iter().flat_map(|&v| f64_to_bf16(v).to_le_bytes())),
        GgufType::Q8_0 => {
            for b in blocks(t)? {
                let b: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        GgufType::Q4_0 => {
            for b in blocks(t)? {
                let b: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in &b {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend(f16(d));
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
        GgufType::Q4_1 => {
            for b in blocks(t)? {
                let b: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                out.extend(f16(d));
                out.extend(f16(min));
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
        GgufType::Other(_) => bail!("cannot write ggml type {t}"),
    }
    Ok(out)
}

/// A tensor to write: name, row-major shape (HF layout; written with the dims reversed), type,
/// and row-major values.
pub type GgufTensorOut = (String, Vec<usize>, GgufType, Vec<f64>);

/// The bytes of a GGUF v3 file holding `metadata` and `tensors` (see [`write_gguf`]).
pub fn serialize_gguf(
    metadata: &BTreeMap<String, GgufValue>,
    tensors: &[GgufTensorOut],
) -> anyhow::Result<Vec<u8>> {
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => bail!("metadata `general.alignment` must be a power of two u32, got {v:?}"),
    };
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend((value.value_type() as u32).to_le_bytes());
        put_value(&mut out, value).with_context(|| format!("metadata key `{key}`"))?;
    }
    let mut data = Vec::new();
    for (name, shape, t, values) in tensors {
        let context = || format!("tensor `{name}` ({t}, shape {shape:?})");
        ensure!(
            (1..=MAX_DIMS).contains(&shape.len()),
            "{}: needs 1 to {MAX_DIMS} dims",
            context()
        );
        ensure!(
            shape.iter().product::<usize>() == values.len(),
            "{}: {} values",
            context(),
            values.len()
        );
        if let GgufType::Q8_0 | GgufType::Q4_0 | GgufType::Q4_1 = t {
            ensure!(
                shape[shape.len() - 1].is_multiple_of(QK),
                "{}: rows must be whole blocks of {QK} elements",
                context()
            );
        }
        let bytes = quantize(*t, values).with_context(context)?;
        let offset = data.len() as u64;
        data.extend(bytes);
        data.resize(align_up(data.len() as u64, alignment).unwrap() as usize, 0);
        put_string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out.resize(align_up(out.len() as u64, alignment).unwrap() as usize, 0);
    out.extend(data);
    Ok(out)
}

/// Writes a GGUF v3 file atomically. Tensor shapes are row-major (HF layout, e.g. `[out, in]`)
/// and are written with the dims reversed, so [`Gguf::tensor`] reads back the same shape.
/// Types F32, F16, BF16, F64, Q8_0, Q4_0 and Q4_1 (the quantised ones need the last dim to be a
/// multiple of 32); `general.alignment` (u32) in `metadata` sets the alignment (default 32).
pub fn write_gguf(
    path: &Path,
    metadata: &BTreeMap<String, GgufValue>,
    tensors: &[GgufTensorOut],
) -> anyhow::Result<()> {
    let bytes =
        serialize_gguf(metadata, tensors).with_context(|| format!("writing {}", path.display()))?;
    super::write_atomic(path, &bytes)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) -> anyhow::Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(t, items) => {
            out.extend((*t as u32).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for (i, item) in items.iter().enumerate() {
                ensure!(
                    item.value_type() == *t,
                    "array of {} has an element #{i} of type {}",
                    t.name(),
                    item.type_name()
                );
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Llama models

/// Undoes llama.cpp's reordering of the rows of a Q or K projection (`[n_head * head_dim, in]`).
///
/// Hugging Face Llama rotates dims `i` and `i + head_dim/2` of each head together (`rotate_half`);
/// ggml rotates adjacent pairs `2i, 2i + 1`. llama.cpp's converter therefore permutes the rows,
/// `w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in)`: GGUF row
/// `h*head_dim + 2i + j` is HF row `h*head_dim + j*head_dim/2 + i`. This maps it back.
fn unpermute_qk(w: &HostTensor, n_head: usize, name: &str) -> anyhow::Result<HostTensor> {
    let [out, cols] = w.shape[..] else {
        bail!("tensor `{name}` has shape {:?}, expected a matrix", w.shape);
    };
    ensure!(
        n_head > 0 && out.is_multiple_of(2 * n_head),
        "tensor `{name}` has {out} rows, not a multiple of 2 × {n_head} heads"
    );
    let hd = out / n_head;
    let half = hd / 2;
    let mut data = vec![0.0; w.data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                data[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&w.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(HostTensor::new(w.shape.clone(), data))
}

/// A Hugging Face `LlamaConfig`-style JSON and the tensors under Hugging Face names, in HF layout
/// (Q and K rows un-permuted, see [`unpermute_qk`]), from a GGUF with `general.architecture =
/// "llama"`. `lm_head.weight` is absent when the file has no `output.weight` (tied embeddings,
/// `tie_word_embeddings: true`). `file` names the file in errors.
pub fn llama_from_gguf(g: &Gguf, file: &str) -> anyhow::Result<(serde_json::Value, Tensors)> {
    llama_inner(g).map_err(|e| anyhow!("{file}: {e:#}"))
}

fn llama_inner(g: &Gguf) -> anyhow::Result<(serde_json::Value, Tensors)> {
    let m = g.meta();
    let arch = m.str("general.architecture")?;
    if arch != "llama" {
        bail!("architecture `{arch}` is not supported (only `llama`)");
    }
    let hidden = m.usize("llama.embedding_length")?;
    let ffn = m.usize("llama.feed_forward_length")?;
    let layers = m.usize("llama.block_count")?;
    let heads = m.usize("llama.attention.head_count")?;
    let kv_heads = m
        .opt("llama.attention.head_count_kv", GgufMeta::usize)?
        .unwrap_or(heads);
    let eps = m.f64("llama.attention.layer_norm_rms_epsilon")?;
    let rope_theta = m
        .opt("llama.rope.freq_base", GgufMeta::f64)?
        .unwrap_or(10000.0);
    let context = m.usize("llama.context_length")?;
    // Sizes are cross-checked against the tensors present before anything is sized by them.
    let blocks: std::collections::BTreeSet<&str> = g
        .tensors
        .iter()
        .filter_map(|t| t.name.strip_prefix("blk.")?.split_once('.').map(|(i, _)| i))
        .collect();
    ensure!(
        layers > 0 && layers == blocks.len(),
        "metadata `llama.block_count` = {layers}, but the file holds tensors of {} blocks",
        blocks.len()
    );
    ensure!(
        (1..=MAX_CONTEXT).contains(&context),
        "metadata `llama.context_length` = {context} is not a context length (1 to {MAX_CONTEXT})"
    );
    ensure!(
        heads > 0 && kv_heads > 0 && hidden.is_multiple_of(heads) && heads.is_multiple_of(kv_heads),
        "inconsistent attention: embedding length {hidden}, {heads} heads, {kv_heads} kv heads"
    );
    let head_dim = hidden / heads;
    ensure!(
        head_dim.is_multiple_of(2),
        "head dimension {head_dim} is odd"
    );
    if let Some(rot) = m.opt("llama.rope.dimension_count", GgufMeta::usize)? {
        ensure!(
            rot == head_dim,
            "llama.rope.dimension_count = {rot} but the head dimension is {head_dim}: partial \
             rotary embeddings are not supported"
        );
    }
    if let Some(s) = m.opt("llama.rope.scaling.type", GgufMeta::str)? {
        ensure!(s == "none", "rope scaling `{s}` is not supported");
    }
    if m.opt("llama.expert_count", GgufMeta::u64)?.unwrap_or(0) > 0 {
        bail!("mixture-of-experts llama models are not supported");
    }
    let vocab = match m.opt("llama.vocab_size", GgufMeta::usize)? {
        Some(v) => v,
        None => m
            .str_array("tokenizer.ggml.tokens")
            .context("neither `llama.vocab_size` nor the token list gives the vocabulary size")?
            .len(),
    };
    let token_id = |key: &str| -> anyhow::Result<serde_json::Value> {
        Ok(m.opt(key, GgufMeta::u64)?
            .map_or(serde_json::Value::Null, |id| id.into()))
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_id("tokenizer.ggml.eos_token_id")?;

    let names: Vec<(&str, String)> = g
        .tensors
        .iter()
        .map(|t| Ok((t.name.as_str(), hf_name(&t.name, layers)?)))
        .collect::<anyhow::Result<_>>()?;
    let tensors: Tensors = names
        .into_par_iter()
        .map(|(name, hf)| {
            let t = g.tensor_unnamed(name)?;
            let kind = hf.rsplit('.').nth(1).unwrap_or_default();
            let expected = match kind {
                "q_proj" => vec![heads * head_dim, hidden],
                "k_proj" | "v_proj" => vec![kv_heads * head_dim, hidden],
                "o_proj" => vec![hidden, heads * head_dim],
                "gate_proj" | "up_proj" => vec![ffn, hidden],
                "down_proj" => vec![hidden, ffn],
                "embed_tokens" | "lm_head" => vec![vocab, hidden],
                _ => vec![hidden], // the RMS norms
            };
            ensure!(
                t.shape == expected,
                "tensor `{name}` has shape {:?} (row-major), expected {expected:?}",
                t.shape
            );
            let t = match kind {
                "q_proj" => unpermute_qk(&t, heads, name)?,
                "k_proj" => unpermute_qk(&t, kv_heads, name)?,
                _ => t,
            };
            Ok((hf, t))
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        tensors.contains_key("model.embed_tokens.weight"),
        "tensor `token_embd.weight` missing"
    );
    let tie = !tensors.contains_key("lm_head.weight");
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "tie_word_embeddings": tie,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    Ok((config, tensors))
}

/// The Hugging Face name of a llama GGUF tensor.
fn hf_name(name: &str, layers: usize) -> anyhow::Result<String> {
    Ok(match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let unknown = || anyhow!("tensor `{name}` is not part of a llama model");
            let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
            let (k, part) = rest.split_once('.').ok_or_else(unknown)?;
            let k: usize = k.parse().map_err(|_| unknown())?;
            ensure!(
                k < layers,
                "tensor `{name}` belongs to block {k}, but llama.block_count is {layers}"
            );
            let hf = match part {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return Err(unknown()),
            };
            format!("model.layers.{k}.{hf}")
        }
    })
}

/// The Q/K row permutation of llama.cpp's converter (HF `rotate_half` order to adjacent pairs),
/// written as numpy's `w.reshape(n_head, 2, out / n_head / 2, in).swapaxes(1, 2)`: tests use it
/// to write GGUF files the way llama.cpp does, independently of [`unpermute_qk`].
#[cfg(test)]
pub(crate) fn permute_like_llama_cpp(w: &HostTensor, n_head: usize) -> HostTensor {
    let (out, cols) = (w.shape[0], w.shape[1]);
    let half = out / n_head / 2;
    // a[h][j][i][c] = w[((h * 2 + j) * half + i) * cols + c]; b = a.swapaxes(1, 2), so
    // b[h][i][j][c] = a[h][j][i][c], stored at ((h * half + i) * 2 + j) * cols + c.
    let mut data = vec![0.0; w.data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                for c in 0..cols {
                    data[((h * half + i) * 2 + j) * cols + c] =
                        w.data[((h * 2 + j) * half + i) * cols + c];
                }
            }
        }
    }
    HostTensor::new(w.shape.clone(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-scale, scale] (a small LCG: no rand state to thread).
    fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn round_trip(tensors: &[GgufTensorOut]) -> Gguf {
        let bytes = serialize_gguf(&BTreeMap::new(), tensors).unwrap();
        parse_gguf(bytes, "test.gguf").unwrap()
    }

    fn f16(x: f64) -> f64 {
        f16_to_f64(f64_to_f16(x))
    }

    #[test]
    fn f16_encoding_is_exact_and_rounds_to_nearest_even() {
        for h in 0..=u16::MAX {
            let x = f16_to_f64(h);
            if !x.is_nan() {
                assert_eq!(f64_to_f16(x), h, "{h:#06x} = {x}");
            }
        }
        let ulp1 = 2f64.powi(-10);
        assert_eq!(f64_to_f16(1.0 + ulp1 / 2.0), 0x3c00); // tie, down to even
        assert_eq!(f64_to_f16(1.0 + 1.5 * ulp1), 0x3c02); // tie, up to even
        assert_eq!(f64_to_f16(1.0 + 0.51 * ulp1), 0x3c01);
        assert_eq!(f64_to_f16(65519.9), 0x7bff);
        assert_eq!(f64_to_f16(65520.0), 0x7c00);
        assert_eq!(f64_to_f16(-1e9), 0xfc00);
        assert_eq!(f64_to_f16(2f64.powi(-25)), 0); // half the smallest subnormal: tie to 0
        assert_eq!(f64_to_f16(1.5 * 2f64.powi(-24)), 2);
        assert_eq!(f64_to_f16(2f64.powi(-14) - 2f64.powi(-26)), 0x0400); // rounds up to normal
        assert!(f16_to_f64(f64_to_f16(f64::NAN)).is_nan());
        assert_eq!(f64_to_bf16(1.0), 0x3f80);
        assert_eq!(f64_to_bf16(1.0 + 2f64.powi(-8)), 0x3f80); // tie, down to even
        assert_eq!(f64_to_bf16(1.0 + 3.0 * 2f64.powi(-8)), 0x3f82); // tie, up to even
    }

    #[test]
    fn float_types_round_trip() {
        let x = values(3 * 40, 1, 3.0);
        let t = |name: &str, ty| (name.to_string(), vec![3, 40], ty, x.clone());
        let g = round_trip(&[
            t("f32", GgufType::F32),
            t("f64", GgufType::F64),
            t("f16", GgufType::F16),
            t("bf16", GgufType::BF16),
        ]);
        for name in ["f32", "f64", "f16", "bf16"] {
            let back = g.tensor(name).unwrap();
            assert_eq!(back.shape, vec![3, 40]);
            assert_eq!(g.tensor_info(name).unwrap().dims, vec![40, 3]);
            for (a, b) in x.iter().zip(&back.data) {
                match name {
                    "f64" => assert_eq!(a, b),
                    "f32" => assert_eq!(*a as f32 as f64, *b),
                    // 11 significant bits (values here are normal halves): relative 2^-11.
                    "f16" => assert!((a - b).abs() <= a.abs() * 2f64.powi(-11), "{a} {b}"),
                    // 8 significant bits: relative 2^-8.
                    _ => assert!((a - b).abs() <= a.abs() * 2f64.powi(-8), "{a} {b}"),
                }
            }
        }
    }

    /// The error bounds of the ggml quantisers, per block of 32 (see `quantize`). `d` is the
    /// scale in f32 before it is stored as f16; the rounding of `q` costs at most half a step
    /// `d/2`, and storing `d` (and `m`) as f16 moves every value by at most `|q| |d - f16(d)|`
    /// (plus `|m - f16(m)|`). The inputs pass through f32 first (relative 2^-24, below 1e-6).
    #[test]
    fn quantised_types_round_trip_within_half_a_step() {
        let x: Vec<f64> = [values(4 * 64, 2, 1.0), values(64, 3, 50.0), vec![0.0; 64]].concat();
        let shape = vec![x.len() / 64, 64];
        let g = round_trip(&[
            ("q8".into(), shape.clone(), GgufType::Q8_0, x.clone()),
            ("q40".into(), shape.clone(), GgufType::Q4_0, x.clone()),
            ("q41".into(), shape.clone(), GgufType::Q4_1, x.clone()),
        ]);
        let eps = 1e-6;
        let q8 = g.tensor("q8").unwrap().data;
        let q40 = g.tensor("q40").unwrap().data;
        let q41 = g.tensor("q41").unwrap().data;
        for (b, xb) in x.chunks(32).enumerate() {
            let r = b * 32..(b + 1) * 32;
            let amax = xb.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            // Q8_0: d = amax / 127, |q| <= 127.
            let d = (amax as f32 / 127.0) as f64;
            let bound = d / 2.0 + 127.0 * (d - f16(d)).abs() + eps * amax;
            for (a, y) in xb.iter().zip(&q8[r.clone()]) {
                assert!(
                    (a - y).abs() <= bound,
                    "Q8_0 block {b}: {a} -> {y}, bound {bound}"
                );
            }
            // Q4_0: d = max / -8, |q - 8| <= 8. The value of largest magnitude is exact (q = 0);
            // the opposite extreme needs q = 16, clamped to 15: an error of up to one step |d|.
            let max = xb
                .iter()
                .copied()
                .fold(0.0, |m: f64, v| if v.abs() > m.abs() { v } else { m });
            let d = (max as f32 / -8.0) as f64;
            for (a, y) in xb.iter().zip(&q40[r.clone()]) {
                let clamped = d != 0.0 && a / d + 8.5 >= 16.0;
                let step = if clamped { d.abs() } else { d.abs() / 2.0 };
                let bound = step + 8.0 * (d - f16(d)).abs() + eps * amax;
                assert!(
                    (a - y).abs() <= bound,
                    "Q4_0 block {b}: {a} -> {y}, bound {bound}"
                );
            }
            // Q4_1: d = (max - min) / 15, m = min, 0 <= q <= 15.
            let (lo, hi) = xb
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let d = ((hi as f32 - lo as f32) / 15.0) as f64;
            let bound = d / 2.0 + 15.0 * (d - f16(d)).abs() + (lo - f16(lo)).abs() + eps * amax;
            for (a, y) in xb.iter().zip(&q41[r.clone()]) {
                assert!(
                    (a - y).abs() <= bound,
                    "Q4_1 block {b}: {a} -> {y}, bound {bound}"
                );
            }
        }
        // The all-zero blocks stay exactly zero.
        assert!(q8[320..]
            .iter()
            .chain(&q40[320..])
            .chain(&q41[320..])
            .all(|&v| v == 0.0));
    }

    #[test]
    fn quantised_block_layouts_match_ggml() {
        // Q4_0: x_j = j - 8 for j < 16 (low nibbles), x_{16+j} = 7 - j (high nibbles). The value
        // of largest magnitude is -8, so d = -8 / -8 = 1 and q = x + 8 exactly.
        let x: Vec<f64> = (0..16)
            .map(|j| j as f64 - 8.0)
            .chain((0..16).map(|j| 7.0 - j as f64))
            .collect();
        let bytes = quantize(GgufType::Q4_0, &x).unwrap();
        let mut expected = 0x3c00u16.to_le_bytes().to_vec(); // d = 1.0
        expected.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        assert_eq!(bytes, expected);
        assert_eq!(dequantize_bytes(GgufType::Q4_0, &bytes, 32), x);
        // Q4_1: x_j = 2 + j/2 (low), x_{16+j} = 2 + (15 - j)/2 (high): m = 2, d = 0.5.
        let x: Vec<f64> = (0..16)
            .map(|j| 2.0 + j as f64 / 2.0)
            .chain((0..16).map(|j| 2.0 + (15 - j) as f64 / 2.0))
            .collect();
        let bytes = quantize(GgufType::Q4_1, &x).unwrap();
        let mut expected = [0x3800u16.to_le_bytes(), 0x4000u16.to_le_bytes()].concat();
        expected.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        assert_eq!(bytes, expected);
        assert_eq!(dequantize_bytes(GgufType::Q4_1, &bytes, 32), x);
        // Q8_0: x_j = 127 - 8j / 2: amax = 127, d = 1, q = x exactly (rounded half away from 0).
        let x: Vec<f64> = (0..32).map(|j| 127.0 - 8.0 * j as f64).collect();
        let bytes = quantize(GgufType::Q8_0, &x).unwrap();
        let mut expected = 0x3c00u16.to_le_bytes().to_vec();
        expected.extend(x.iter().map(|&v| v as i8 as u8));
        assert_eq!(bytes, expected);
        assert_eq!(dequantize_bytes(GgufType::Q8_0, &bytes, 32), x);
        // Rows that are not whole blocks cannot be quantised.
        let e = serialize_gguf(
            &BTreeMap::new(),
            &[("w".into(), vec![2, 16], GgufType::Q8_0, vec![0.0; 32])],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("tensor `w`"), "{e:#}");
    }

    fn all_value_types() -> BTreeMap<String, GgufValue> {
        use GgufValue as V;
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v| {
            m.insert(k.to_string(), v);
        };
        put("u8", V::U8(250));
        put("i8", V::I8(-7));
        put("u16", V::U16(65000));
        put("i16", V::I16(-30000));
        put("u32", V::U32(4_000_000_000));
        put("i32", V::I32(-2_000_000_000));
        put("u64", V::U64(u64::MAX));
        put("i64", V::I64(i64::MIN));
        put("f32", V::F32(1e-5));
        put("f64", V::F64(-2.5e300));
        put("bool", V::Bool(true));
        put("string", V::String("naïve — “quotes” 🙂".into()));
        put("empty", V::String(String::new()));
        put("strings", V::string_array(["a b", "Ġthe", ""]));
        put(
            "ints",
            V::Array(GgufValueType::I32, vec![V::I32(1), V::I32(-3)]),
        );
        put("no floats", V::Array(GgufValueType::F32, vec![]));
        put(
            "nested",
            V::Array(
                GgufValueType::Array,
                vec![
                    V::Array(GgufValueType::U8, vec![V::U8(1), V::U8(2)]),
                    V::string_array(["x"]),
                ],
            ),
        );
        put("general.alignment", V::U32(64));
        m
    }

    #[test]
    fn metadata_of_every_type_round_trips() {
        let meta = all_value_types();
        let tensors = [
            ("a".into(), vec![3], GgufType::F32, vec![1.0, 2.0, 3.0]),
            ("b".into(), vec![2, 2, 2], GgufType::F16, vec![0.5; 8]),
        ];
        let bytes = serialize_gguf(&meta, &tensors).unwrap();
        let g = parse_gguf(bytes, "m.gguf").unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.metadata, meta);
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_start % 64, 0);
        assert_eq!(g.tensors[1].offset % 64, 0);
        assert_eq!(g.tensor("a").unwrap().data, vec![1.0, 2.0, 3.0]);
        assert_eq!(g.tensor("b").unwrap().shape, vec![2, 2, 2]);
        // Typed getters.
        assert_eq!(g.get_u64("u8").unwrap(), 250);
        assert_eq!(g.get_u64("u64").unwrap(), u64::MAX);
        assert_eq!(g.get_i64("i64").unwrap(), i64::MIN);
        assert_eq!(g.get_f64("f32").unwrap(), 1e-5);
        assert_eq!(g.get_f64("u16").unwrap(), 65000.0);
        assert!(g.get_bool("bool").unwrap());
        assert_eq!(g.get_str("string").unwrap(), "naïve — “quotes” 🙂");
        assert_eq!(g.get_str_array("strings").unwrap(), vec!["a b", "Ġthe", ""]);
        assert_eq!(g.get_i64_array("ints").unwrap(), vec![1, -3]);
        assert!(g.get_f64_array("no floats").unwrap().is_empty());
        let e = g.get_u64("i8").unwrap_err().to_string();
        assert_eq!(
            e,
            "m.gguf: metadata key `i8` has type i8, expected a non-negative integer"
        );
        let e = g.get_str("strings").unwrap_err().to_string();
        assert_eq!(
            e,
            "m.gguf: metadata key `strings` has type array of string, expected string"
        );
        let e = g.get_f64("nope").unwrap_err().to_string();
        assert_eq!(e, "m.gguf: metadata key `nope` missing");
        assert_eq!(g.meta().opt("nope", GgufMeta::u64).unwrap(), None);
        assert!(g.meta().opt("string", GgufMeta::u64).is_err());
        // Version 2 files read the same.
        let mut v2 = serialize_gguf(&meta, &tensors).unwrap();
        v2[4..8].copy_from_slice(&2u32.to_le_bytes());
        let g2 = parse_gguf(v2, "v2.gguf").unwrap();
        assert_eq!((g2.version, &g2.metadata), (2, &meta));
    }

    #[test]
    fn write_gguf_writes_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.gguf");
        let x = values(64, 4, 1.0);
        write_gguf(
            &path,
            &BTreeMap::new(),
            &[("w".into(), vec![2, 32], GgufType::Q8_0, x)],
        )
        .unwrap();
        let g = read_gguf(&path).unwrap();
        assert_eq!(g.tensors().unwrap()["w"].shape, vec![2, 32]);
        let e = read_gguf(&dir.path().join("missing.gguf")).unwrap_err();
        assert!(e.to_string().contains("missing.gguf"));
    }

    fn small_file() -> Vec<u8> {
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), GgufValue::string_array(["ab", "c"]));
        meta.insert("n".to_string(), GgufValue::U32(7));
        serialize_gguf(
            &meta,
            &[
                (
                    "emb".into(),
                    vec![2, 32],
                    GgufType::Q4_1,
                    values(64, 5, 1.0),
                ),
                ("norm".into(), vec![4], GgufType::F32, vec![1.0; 4]),
            ],
        )
        .unwrap()
    }

    #[test]
    fn truncated_or_corrupt_files_are_errors_not_panics() {
        let bytes = small_file();
        let g = parse_gguf(bytes.clone(), "ok.gguf").unwrap();
        assert_eq!(g.tensors().unwrap().len(), 2);
        // Every truncation before the end of the last tensor fails (what follows is padding),
        // with the file named; cuts in the data name the tensor.
        let end = g.data_start + 64 + 16;
        assert_eq!(bytes.len(), g.data_start + 96);
        for n in 0..end {
            let e = parse_gguf(bytes[..n].to_vec(), "cut.gguf")
                .err()
                .unwrap_or_else(|| panic!("truncated to {n} bytes: no error"));
            let msg = format!("{e:#}");
            assert!(msg.starts_with("cut.gguf: "), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
            // `emb` is two Q4_1 blocks (40 bytes), `norm` follows at the next multiple of 32.
            if n >= g.data_start + 40 {
                assert!(msg.contains("tensor `norm`"), "{msg}");
            } else if n >= g.data_start {
                assert!(msg.contains("tensor `emb`"), "{msg}");
            }
        }
        let e = parse_gguf(bytes[..end - 1].to_vec(), "cut.gguf").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // Bad magic, bad version.
        let mut bad = bytes.clone();
        bad[..4].copy_from_slice(b"GGML");
        let e = parse_gguf(bad, "bad.gguf").unwrap_err().to_string();
        assert!(e.starts_with("bad.gguf: not a GGUF file"), "{e}");
        let mut bad = bytes.clone();
        bad[4..8].copy_from_slice(&1u32.to_le_bytes());
        let e = parse_gguf(bad, "v1.gguf").unwrap_err().to_string();
        assert!(e.contains("version 1"), "{e}");
        // Absurd counts are refused before anything is allocated.
        let mut bad = bytes.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_gguf(bad, "x").is_err());
        // Any single byte set to 0x00 or 0xff before the data: an error or a file, never a panic.
        for i in 0..g.data_start {
            for v in [0x00, 0xff, 0x09] {
                let mut bad = bytes.clone();
                bad[i] = v;
                if let Ok(g) = parse_gguf(bad, "x") {
                    let _ = g.tensors();
                }
            }
        }
    }

    /// Offset of the ggml type field of the first tensor of a file without metadata.
    fn first_type_field(name: &str, n_dims: usize) -> usize {
        24 + 8 + name.len() + 4 + 8 * n_dims
    }

    #[test]
    fn unsupported_types_are_named() {
        let mut bytes = serialize_gguf(
            &BTreeMap::new(),
            &[("blk.0.w".into(), vec![256], GgufType::F32, vec![0.0; 256])],
        )
        .unwrap();
        let at = first_type_field("blk.0.w", 1);
        assert_eq!(bytes[at..at + 4], 0u32.to_le_bytes());
        // Q6_K: 256 elements take 210 of the 1024 bytes there, so the file opens.
        bytes[at..at + 4].copy_from_slice(&14u32.to_le_bytes());
        let g = parse_gguf(bytes.clone(), "k.gguf").unwrap();
        let e = g.tensor("blk.0.w").unwrap_err().to_string();
        assert!(e.starts_with("k.gguf: tensor `blk.0.w` (Q6_K): "), "{e}");
        assert!(e.contains("cannot be dequantised"), "{e}");
        assert!(g.tensors().is_err());
        // An id ggml does not have.
        bytes[at..at + 4].copy_from_slice(&999u32.to_le_bytes());
        let g = parse_gguf(bytes, "k.gguf").unwrap();
        let e = g.tensor("blk.0.w").unwrap_err().to_string();
        assert!(e.contains("ggml type 999"), "{e}");
        assert!(g
            .tensor("nope")
            .unwrap_err()
            .to_string()
            .contains("no tensor `nope`"));
    }

    /// HF -> GGUF row order of llama.cpp's converter, written as the numpy it does:
    /// `w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)`.
    #[test]
    fn q_and_k_rows_are_unpermuted_exactly() {
        for (n_head, hd, cols) in [(2, 4, 3), (3, 8, 5), (1, 6, 2)] {
            let out = n_head * hd;
            let w = HostTensor::new(vec![out, cols], (0..out * cols).map(|k| k as f64).collect());
            let p = permute_like_llama_cpp(&w, n_head);
            assert_ne!(p, w);
            assert_eq!(unpermute_qk(&p, n_head, "q").unwrap(), w);
        }
        // Head 0 of hd = 4: GGUF rows are HF rows [0, 2, 1, 3] (pairs (i, i + hd/2) adjacent).
        let w = HostTensor::new(vec![4, 1], vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(permute_like_llama_cpp(&w, 1).data, vec![0.0, 2.0, 1.0, 3.0]);
        assert!(unpermute_qk(&HostTensor::new(vec![6, 1], vec![0.0; 6]), 2, "q").is_err());
    }

    /// A tiny llama in HF layout, written the way llama.cpp's converter does (Q, K permuted).
    fn tiny_llama(tied: bool) -> (BTreeMap<String, GgufValue>, Vec<GgufTensorOut>, Tensors) {
        let (d, heads, kv, ffn, vocab, layers) = (8, 2, 1, 12, 10, 2);
        let hd = d / heads;
        let mut meta = BTreeMap::new();
        let mut put = |k: &str, v| {
            meta.insert(k.to_string(), v);
        };
        put("general.architecture", GgufValue::String("llama".into()));
        put("llama.embedding_length", GgufValue::U32(d as u32));
        put("llama.feed_forward_length", GgufValue::U32(ffn as u32));
        put("llama.block_count", GgufValue::U32(layers as u32));
        put("llama.attention.head_count", GgufValue::U32(heads as u32));
        put("llama.attention.head_count_kv", GgufValue::U32(kv as u32));
        put(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-6),
        );
        put("llama.context_length", GgufValue::U32(64));
        put("llama.rope.dimension_count", GgufValue::U32(hd as u32));
        put(
            "tokenizer.ggml.tokens",
            GgufValue::string_array((0..vocab).map(|i| format!("t{i}"))),
        );
        put("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
        let mut hf = Tensors::new();
        let mut gguf = Vec::new();
        let mut seed = 10;
        let mut add = |hf_name: String, gguf_name: String, shape: Vec<usize>, perm: usize| {
            seed += 1;
            let t = HostTensor::new(shape.clone(), values(shape.iter().product(), seed, 1.0));
            let stored = if perm > 0 {
                permute_like_llama_cpp(&t, perm)
            } else {
                t.clone()
            };
            gguf.push((gguf_name, shape, GgufType::F32, stored.data));
            hf.insert(
                hf_name,
                HostTensor::new(t.shape, t.data.iter().map(|&v| v as f32 as f64).collect()),
            );
        };
        add(
            "model.embed_tokens.weight".into(),
            "token_embd.weight".into(),
            vec![vocab, d],
            0,
        );
        for k in 0..layers {
            let l = |s: &str| format!("model.layers.{k}.{s}.weight");
            let b = |s: &str| format!("blk.{k}.{s}.weight");
            add(l("input_layernorm"), b("attn_norm"), vec![d], 0);
            add(
                l("self_attn.q_proj"),
                b("attn_q"),
                vec![heads * hd, d],
                heads,
            );
            add(l("self_attn.k_proj"), b("attn_k"), vec![kv * hd, d], kv);
            add(l("self_attn.v_proj"), b("attn_v"), vec![kv * hd, d], 0);
            add(
                l("self_attn.o_proj"),
                b("attn_output"),
                vec![d, heads * hd],
                0,
            );
            add(l("post_attention_layernorm"), b("ffn_norm"), vec![d], 0);
            add(l("mlp.gate_proj"), b("ffn_gate"), vec![ffn, d], 0);
            add(l("mlp.up_proj"), b("ffn_up"), vec![ffn, d], 0);
            add(l("mlp.down_proj"), b("ffn_down"), vec![d, ffn], 0);
        }
        add(
            "model.norm.weight".into(),
            "output_norm.weight".into(),
            vec![d],
            0,
        );
        if !tied {
            add(
                "lm_head.weight".into(),
                "output.weight".into(),
                vec![vocab, d],
                0,
            );
        }
        (meta, gguf, hf)
    }

    #[test]
    fn llama_mapping_gives_hf_names_layout_and_config() {
        for tied in [true, false] {
            let (meta, tensors, hf) = tiny_llama(tied);
            let g = parse_gguf(serialize_gguf(&meta, &tensors).unwrap(), "tiny.gguf").unwrap();
            let (config, got) = llama_from_gguf(&g, "tiny.gguf").unwrap();
            assert_eq!(got, hf);
            let expected = serde_json::json!({
                "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10,
                "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
                "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 64, "tie_word_embeddings": tied,
                "attention_bias": false, "mlp_bias": false, "bos_token_id": 1,
                "eos_token_id": null,
            });
            assert_eq!(config, expected);
        }
        // Errors name the file and the problem.
        let (mut meta, mut tensors, _) = tiny_llama(true);
        let file = |meta: &BTreeMap<String, GgufValue>, t: &[GgufTensorOut]| {
            parse_gguf(serialize_gguf(meta, t).unwrap(), "tiny.gguf").unwrap()
        };
        tensors.push((
            "rope_freqs.weight".into(),
            vec![2],
            GgufType::F32,
            vec![1.0; 2],
        ));
        let e = llama_from_gguf(&file(&meta, &tensors), "tiny.gguf").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tiny.gguf: tensor `rope_freqs.weight` is not part of a llama model"
        );
        tensors.pop();
        tensors[1].1 = vec![9];
        tensors[1].3 = vec![0.0; 9];
        let e = llama_from_gguf(&file(&meta, &tensors), "tiny.gguf").unwrap_err();
        assert!(
            e.to_string()
                .contains("`blk.0.attn_norm.weight` has shape [9]"),
            "{e}"
        );
        meta.insert(
            "general.architecture".into(),
            GgufValue::String("gpt2".into()),
        );
        let e = llama_from_gguf(&file(&meta, &tensors), "tiny.gguf").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tiny.gguf: architecture `gpt2` is not supported (only `llama`)"
        );
        meta.remove("general.architecture");
        let e = llama_from_gguf(&file(&meta, &tensors), "tiny.gguf").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tiny.gguf: metadata key `general.architecture` missing"
        );
    }

    #[test]
    fn llama_sizes_are_checked_against_the_tensors_present() {
        let (meta, tensors, _) = tiny_llama(true);
        let with = |key: &str, v: u64| {
            let mut m = meta.clone();
            m.insert(key.into(), GgufValue::U64(v));
            let g = parse_gguf(serialize_gguf(&m, &tensors).unwrap(), "tiny.gguf").unwrap();
            llama_from_gguf(&g, "tiny.gguf").map(|(c, _)| c)
        };
        // The file holds 2 blocks.
        for v in [0, 1, 3, 1 << 31, u64::MAX] {
            let e = with("llama.block_count", v).unwrap_err().to_string();
            assert!(
                e.contains("`llama.block_count` = ") && e.contains("tensors of 2 blocks")
                    || e.contains("too large"),
                "{v}: {e}"
            );
        }
        for v in [0, (1 << 24) + 1, 1 << 31] {
            let e = with("llama.context_length", v).unwrap_err().to_string();
            assert!(e.contains(&format!("`llama.context_length` = {v}")), "{e}");
        }
        // A context of 1 is a model (refused later against data of more positions).
        let c = with("llama.context_length", 1).unwrap();
        assert_eq!(c["max_position_embeddings"], 1);
        // Head counts: kv heads must divide heads, heads the width.
        for (key, v) in [
            ("llama.attention.head_count", 3),
            ("llama.attention.head_count", 1 << 31),
            ("llama.attention.head_count_kv", 4),
            ("llama.attention.head_count_kv", 0),
        ] {
            let e = with(key, v).unwrap_err().to_string();
            assert!(e.contains("inconsistent attention"), "{key} {v}: {e}");
        }
        // A head count that divides everything but does not match the tensors' shapes.
        let e = with("llama.attention.head_count", 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has shape") || e.contains("head dimension"),
            "{e}"
        );
    }

    /// A tensor name, some `(row, column, value)` entries, and two checksums.
    type Expected<'a> = (&'a str, &'a [(usize, usize, f64)], f64, f64);

    const SMOLLM2: &str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

    #[test]
    #[ignore = "needs data/smollm2: scripts/fetch-data.sh smollm2"]
    fn smollm2_gguf_parses_and_dequantises() {
        let path = Path::new(SMOLLM2);
        assert!(
            path.exists(),
            "{SMOLLM2} not found: run scripts/fetch-data.sh smollm2"
        );
        let g = read_gguf(path).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.tensors.len(), 272);
        let (config, tensors) = llama_from_gguf(&g, SMOLLM2).unwrap();
        println!("{config}");
        let c = |k: &str| config[k].clone();
        assert_eq!(c("num_hidden_layers"), 30);
        assert_eq!(c("hidden_size"), 576);
        assert_eq!(c("num_attention_heads"), 9);
        assert_eq!(c("num_key_value_heads"), 3);
        assert_eq!(c("intermediate_size"), 1536);
        assert_eq!(c("vocab_size"), 49152);
        assert_eq!(c("rope_theta"), 100000.0);
        assert_eq!(c("rms_norm_eps"), 1e-5);
        assert_eq!(c("max_position_embeddings"), 8192);
        assert_eq!(c("tie_word_embeddings"), true);
        assert_eq!(c("bos_token_id"), 1);
        assert_eq!(c("eos_token_id"), 2);
        assert_eq!(tensors.len(), 272);
        // Independent values: `gguf.quants.dequantize` of the Python package gguf 0.19.0 (f32),
        // with Q and K rows reordered by transformers 5.24's `_reverse_permute_weights`
        // (`w.reshape(n_head, hd/2, 2, in).swapaxes(2, 1)`, 9 heads for Q, 3 for K). The checksum
        // is sum(a[i, j] * (i % 7 + j % 5)), then sum(a[i, j]), computed in f64.
        let expected: [Expected; 4] = [
            (
                "model.layers.0.self_attn.q_proj.weight",
                &[
                    (0, 0, -0.0963134765625),
                    (1, 0, -0.1591796875),
                    (2, 0, -0.109375),
                    (3, 0, -0.19415283203125),
                    (4, 0, -0.0462646484375),
                    (5, 0, 0.0125732421875),
                    (33, 5, -0.06280517578125),
                ],
                -324.91552734375,
                59.22322082519531,
            ),
            (
                "model.layers.0.self_attn.k_proj.weight",
                &[
                    (0, 1, 0.3402099609375),
                    (1, 1, 0.09136962890625),
                    (2, 1, 0.291748046875),
                    (3, 1, 0.15203857421875),
                    (4, 1, -0.112701416015625),
                    (5, 1, 0.189208984375),
                    (100, 7, 0.049072265625),
                ],
                239.85580444335938,
                26.937057495117188,
            ),
            (
                "model.embed_tokens.weight",
                &[
                    (1000, 0, -0.1119384765625),
                    (1000, 1, -0.0739593505859375),
                    (1000, 2, 0.0379791259765625),
                ],
                -262711.1542134285,
                -15353.04449415207,
            ),
            (
                "model.layers.3.mlp.down_proj.weight",
                &[
                    (5, 0, 0.08868408203125),
                    (5, 1, 0.013916015625),
                    (5, 2, -0.06085205078125),
                ],
                156.64115142822266,
                81.66989135742188,
            ),
        ];
        for (name, entries, weighted, plain) in expected {
            let t = &tensors[name];
            let cols = t.shape[1];
            for &(i, j, v) in entries {
                let got = t.data[i * cols + j];
                assert!(
                    (got - v).abs() <= 1e-6 * v.abs(),
                    "{name}[{i}, {j}] = {got}, not {v}"
                );
            }
            let w = |k: usize| ((k / cols) % 7 + (k % cols) % 5) as f64;
            let (mut sw, mut s, mut scale) = (0.0, 0.0, 0.0);
            for (k, &v) in t.data.iter().enumerate() {
                sw += v * w(k);
                s += v;
                scale += v.abs() * (w(k) + 1.0);
            }
            // gguf-py rounds each value to f32 (relative 2^-24): allow 1e-7 of the sum of |terms|.
            assert!(
                (sw - weighted).abs() <= 1e-7 * scale,
                "{name}: {sw} vs {weighted}"
            );
            assert!((s - plain).abs() <= 1e-7 * scale, "{name}: {s} vs {plain}");
        }
        let mut types = BTreeMap::<String, usize>::new();
        for t in &g.tensors {
            *types.entry(t.ggml_type.name()).or_default() += 1;
        }
        println!("tensor types: {types:?}");
        for (name, t) in &tensors {
            let n = t.data.len() as f64;
            let mean = t.data.iter().sum::<f64>() / n;
            let std = (t.data.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
            let amax = t.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(t.data.iter().all(|v| v.is_finite()), "{name}");
            assert!(
                std > 1e-3 && amax < 100.0,
                "{name}: std {std}, max |x| {amax}"
            );
            if name.contains("layers.0.") || !name.contains("layers.") {
                println!(
                    "{name:45} {:?} mean {mean:+.4} std {std:.4} max|x| {amax:.3}",
                    t.shape
                );
            }
        }
    }
}
