//! Inputs and loaders shared by the fuzz suite (`tests/fuzz.rs`, run in CI) and the larger
//! campaign (`examples/fuzz_campaign.rs`): for each format a small valid input built here (by
//! hand or with the library's own writers), truncated at many offsets, hit by seeded byte flips
//! and by structured header mutations, plus the adversarial inputs of issue 10. Nothing is read
//! from or written into the repository; loaders that need a path write into a temp folder.
//!
//! A counting global allocator measures each load's peak allocation (loads run one at a time).

#![allow(dead_code)]

use ibasis::data::text::{TextDataset, TextOptions};
use ibasis::data::tokenizer::{Gpt2Tokenizer, Tokenizer};
use ibasis::io::gguf::{parse_gguf, serialize_gguf, GgufTensorOut, GgufType, GgufValue};
use ibasis::io::weights::{parse_safetensors, serialize_safetensors, Tensors};
use ibasis::models::transformer::hf::{hf_model_from_tensors, LmOptions};
use ibasis::tensor::HostTensor;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Allocation accounting

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Relaxed);
            let now = CURRENT.fetch_add(new, Relaxed) + new;
            PEAK.fetch_max(now, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A load may allocate at most `FACTOR * input bytes + SLACK` at its peak.
pub const FACTOR: usize = 64;
pub const SLACK: usize = 16 << 20;

/// What one load did.
#[derive(Debug)]
pub enum Outcome {
    Ok,
    /// A clean error: its text (one line expected).
    Error(String),
    Panic(String),
}

/// One generated input.
pub struct Case {
    pub format: &'static str,
    pub what: String,
    pub input: Vec<u8>,
}

impl Case {
    fn new(format: &'static str, what: impl Into<String>, input: Vec<u8>) -> Self {
        Case {
            format,
            what: what.into(),
            input,
        }
    }

    /// Loads the input with its format's loader, catching panics: the outcome and the peak
    /// bytes allocated meanwhile (above what was live before).
    pub fn run(&self, dir: &Path) -> (Outcome, usize) {
        let base = CURRENT.load(Relaxed);
        PEAK.store(base, Relaxed);
        let r = catch_unwind(AssertUnwindSafe(|| load(self.format, &self.input, dir)));
        let peak = PEAK.load(Relaxed).saturating_sub(base);
        let outcome = match r {
            Ok(Ok(())) => Outcome::Ok,
            Ok(Err(e)) => Outcome::Error(format!("{e:#}")),
            Err(p) => Outcome::Panic(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ),
        };
        (outcome, peak)
    }

    /// The allocation bound of this input.
    pub fn cap(&self) -> usize {
        FACTOR * self.input.len() + SLACK
    }
}

// ---------------------------------------------------------------------------------------------
// Loaders

/// The formats, in table order.
pub const FORMATS: [&str; 8] = [
    "pt",
    "safetensors",
    "gguf",
    "hf config.json",
    "idx",
    "cifar",
    "text",
    "toml",
];

fn load(format: &str, b: &[u8], dir: &Path) -> anyhow::Result<()> {
    match format {
        "pt" => {
            let p = dir.join("model.pt");
            std::fs::write(&p, b)?;
            ibasis::io::pt::load_pt(&p).map(drop)
        }
        "safetensors" => parse_safetensors(b).map(drop),
        "gguf" => {
            let g = parse_gguf(b.to_vec(), "fuzz.gguf")?;
            let (config, tensors) = ibasis::io::gguf::llama_from_gguf(&g, "fuzz.gguf")?;
            hf_model_from_tensors(&config, tensors, &LmOptions::default(), "fuzz.gguf").map(drop)
        }
        "hf config.json" => {
            let v: serde_json::Value = serde_json::from_slice(b)?;
            hf_model_from_tensors(&v, gpt2_tensors(3), &LmOptions::default(), "config.json")
                .map(drop)
        }
        "idx" => ibasis::data::mnist::parse_idx(b, 3).map(drop),
        "cifar" => {
            let p = dir.join("data_batch_1.bin");
            std::fs::write(&p, b)?;
            ibasis::data::cifar::Cifar10::from_files(&[p]).map(drop)
        }
        "text" => {
            let p = dir.join("a.txt");
            std::fs::write(&p, b)?;
            let chunks = |n_ctx: usize| {
                let mut opts = TextOptions::new(n_ctx);
                opts.n_samples = Some(4);
                TextDataset::new(std::slice::from_ref(&p), tokenizer(), &opts)
            };
            // Longer chunks than the text holds: an error, or (when it is long) a dataset.
            let _ = chunks(1000);
            chunks(1)?;
            chunks(8).map(drop)
        }
        "toml" => {
            let text = std::str::from_utf8(b)?;
            ibasis::experiments::config::RunConfig::parse(text).map(drop)
        }
        other => anyhow::bail!("no loader for {other}"),
    }
}

fn tokenizer() -> &'static dyn Tokenizer {
    static T: OnceLock<Gpt2Tokenizer> = OnceLock::new();
    T.get_or_init(Gpt2Tokenizer::new)
}

/// A fresh temp folder for loaders that read files.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ibasis-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// splitmix64: the seeded byte flips.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Truncations at up to `max` offsets spread over the input (every offset when it is short).
fn truncations(format: &'static str, tag: &str, bytes: &[u8], max: usize, out: &mut Vec<Case>) {
    let step = (bytes.len() / max.max(1)).max(1);
    for n in (0..bytes.len()).step_by(step) {
        out.push(Case::new(
            format,
            format!("{tag} cut at {n}"),
            bytes[..n].to_vec(),
        ));
    }
}

/// `n` copies of `bytes` with 1 to 4 seeded random bytes replaced.
fn flips(format: &'static str, tag: &str, bytes: &[u8], n: usize, seed: u64, out: &mut Vec<Case>) {
    let mut rng = Rng(seed);
    for k in 0..n {
        let mut b = bytes.to_vec();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                _ => rng.next() as u8,
            };
        }
        out.push(Case::new(
            format,
            format!("{tag} flip #{k} (seed {seed})"),
            b,
        ));
    }
}

/// Integers that break things: zero, one, small, huge, negative, fractional.
const EXTREMES: [&str; 9] = [
    "0",
    "1",
    "4",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "-1",
    "1.5",
    "1000000000000",
];

/// Every generated input, `scale` times as many truncations and flips as the CI suite's
/// (`scale` 1) and with seeds `seed0..`.
pub fn cases(scale: usize, seed0: u64) -> Vec<Case> {
    let mut out = Vec::new();
    pt_cases(scale, seed0, &mut out);
    safetensors_cases(scale, seed0, &mut out);
    gguf_cases(scale, seed0, &mut out);
    hf_cases(scale, seed0, &mut out);
    idx_cases(scale, seed0, &mut out);
    cifar_cases(scale, seed0, &mut out);
    text_cases(scale, seed0, &mut out);
    toml_cases(scale, seed0, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// pt: a torch.save zip with a hand-written pickle

fn zip_stored(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in members {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let offset = out.len() as u32;
        let mut common = Vec::new();
        common.extend(20u16.to_le_bytes());
        common.extend(0u16.to_le_bytes());
        common.extend(0u16.to_le_bytes());
        common.extend(0u32.to_le_bytes());
        common.extend(crc.sum().to_le_bytes());
        common.extend((data.len() as u32).to_le_bytes());
        common.extend((data.len() as u32).to_le_bytes());
        common.extend((name.len() as u16).to_le_bytes());
        common.extend(0u16.to_le_bytes());
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(&common);
        out.extend(name.as_bytes());
        out.extend(data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes());
        central.extend(&common);
        central.extend([0u8; 10]);
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

fn pstr(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
}

fn pint(p: &mut Vec<u8>, i: i64) {
    // LONG1 (8 bytes) so that any i64 can be written.
    p.push(0x8a);
    p.push(8);
    p.extend(i.to_le_bytes());
}

fn pints(p: &mut Vec<u8>, v: &[i64]) {
    p.push(b'(');
    for &i in v {
        pint(p, i);
    }
    p.push(b't');
}

/// `{"w": _rebuild_tensor_v2(storage 0 (FloatStorage), 0, size, stride, False, OrderedDict())}`.
pub fn tensor_pickle(size: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    pstr(&mut p, "w");
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'(');
    pstr(&mut p, "storage");
    p.extend(b"ctorch\nFloatStorage\n");
    pstr(&mut p, "0");
    pstr(&mut p, "cpu");
    pint(&mut p, 6);
    p.extend([b't', b'Q']);
    pint(&mut p, 0);
    pints(&mut p, size);
    pints(&mut p, stride);
    p.push(0x89);
    p.extend(b"ccollections\nOrderedDict\n)R");
    p.extend([b't', b'R', b'u', b'.']);
    p
}

/// A torch.save archive around `pkl` with one 6-float storage.
pub fn pt_file(pkl: &[u8]) -> Vec<u8> {
    let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    zip_stored(&[
        ("archive/data.pkl", pkl.to_vec()),
        ("archive/byteorder", b"little".to_vec()),
        ("archive/data/0", storage),
    ])
}

fn pt_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "pt";
    let pkl = tensor_pickle(&[2, 3], &[3, 1]);
    let valid = pt_file(&pkl);
    out.push(Case::new(f, "valid", valid.clone()));
    truncations(f, "archive", &valid, 150 * scale, out);
    flips(f, "archive", &valid, 150 * scale, seed + 11, out);
    // The pickle alone mutated (the zip rebuilt around it with a correct CRC).
    let mut inner = Vec::new();
    flips(f, "pickle", &pkl, 150 * scale, seed + 12, &mut inner);
    truncations(f, "pickle", &pkl, 100 * scale, &mut inner);
    for c in inner {
        out.push(Case::new(f, c.what, pt_file(&c.input)));
    }
    // Huge, negative and stride-0 views.
    for (size, stride) in [
        (vec![1_000_000_000i64], vec![0i64]),
        (vec![784, 100_000_000], vec![0, 0]),
        (vec![1 << 40, 1 << 40], vec![0, 0]),
        (vec![6, 6], vec![0, 1]),
        (vec![-1], vec![1]),
        (vec![2, 3], vec![i64::MAX, 1]),
        (vec![2, 3], vec![3, -1]),
    ] {
        out.push(Case::new(
            f,
            format!("view {size:?} stride {stride:?}"),
            pt_file(&tensor_pickle(&size, &stride)),
        ));
    }
    // A million nested one-tuples, and a memo "billion laughs" of 40 doublings.
    let mut deep = vec![0x80, 2, b'N'];
    deep.extend(std::iter::repeat_n(0x85, 1_000_000));
    deep.push(b'.');
    out.push(Case::new(f, "1M nested tuples", pt_file(&deep)));
    let mut laughs = vec![0x80, 2, b'N'];
    for _ in 0..40 {
        laughs.extend([b'q', 0, b'h', 0, b'h', 0, 0x86]);
    }
    laughs.push(b'.');
    out.push(Case::new(f, "memo billion laughs", pt_file(&laughs)));
    // A deflated member claiming 4 GB.
    let mut bomb = valid.clone();
    if let Some(i) = bomb.windows(4).rposition(|w| w == [0x50, 0x4b, 0x01, 0x02]) {
        bomb[i + 10] = 8;
        bomb[i + 24..i + 28].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    out.push(Case::new(f, "deflate size 4 GB", bomb));
}

// ---------------------------------------------------------------------------------------------
// safetensors

fn small_tensors() -> Tensors {
    let mut t = Tensors::new();
    t.insert(
        "a".into(),
        HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
    );
    t.insert("b".into(), HostTensor::new(vec![4], vec![0.5; 4]));
    t
}

fn safetensors_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "safetensors";
    for as_f32 in [false, true] {
        let tag = if as_f32 { "f32" } else { "f64" };
        let bytes = serialize_safetensors(&small_tensors(), as_f32, None).unwrap();
        out.push(Case::new(f, format!("{tag} valid"), bytes.clone()));
        truncations(f, tag, &bytes, 100 * scale, out);
        flips(f, tag, &bytes, 150 * scale, seed + 1 + as_f32 as u64, out);
        // Header mutations: shapes, dtypes and offsets replaced by extreme values.
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + hlen].to_vec()).unwrap();
        for x in EXTREMES {
            for (from, to) in [
                ("[2,3]", format!("[{x},3]")),
                ("[4]", format!("[{x}]")),
                ("\"F", "\"BOOL".to_string()),
                ("[0,", format!("[{x},")),
                ("data_offsets\":[", format!("data_offsets\":[{x},")),
            ] {
                let h = header.replacen(from, &to, 1);
                let mut b = (h.len() as u64).to_le_bytes().to_vec();
                b.extend(h.as_bytes());
                b.extend(&bytes[8 + hlen..]);
                out.push(Case::new(f, format!("{tag} header {from} -> {to}"), b));
            }
        }
        // The header length itself.
        for n in [0u64, 1, hlen as u64 + 1, u32::MAX as u64, u64::MAX] {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&n.to_le_bytes());
            out.push(Case::new(f, format!("{tag} header length {n}"), b));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF: a tiny llama, parsed and mapped onto a model

pub fn tiny_llama_gguf(meta_override: &[(&str, GgufValue)]) -> Vec<u8> {
    let (d, ffn, vocab, heads) = (4usize, 8usize, 6usize, 2usize);
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: GgufValue| {
        m.insert(k.to_string(), v);
    };
    put("general.architecture", GgufValue::String("llama".into()));
    put("llama.embedding_length", GgufValue::U32(d as u32));
    put("llama.feed_forward_length", GgufValue::U32(ffn as u32));
    put("llama.block_count", GgufValue::U32(1));
    put("llama.attention.head_count", GgufValue::U32(heads as u32));
    put("llama.attention.head_count_kv", GgufValue::U32(1));
    put(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(1e-5),
    );
    put("llama.context_length", GgufValue::U32(8));
    put("llama.vocab_size", GgufValue::U32(vocab as u32));
    put(
        "tokenizer.ggml.tokens",
        GgufValue::string_array((0..vocab).map(|i| format!("t{i}"))),
    );
    for (k, v) in meta_override {
        put(k, v.clone());
    }
    let val = |n: usize, s: usize| -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 7 + s * 3) % 11) as f64 / 10.0 - 0.5)
            .collect()
    };
    let dh = d / heads;
    let mut t: Vec<GgufTensorOut> = Vec::new();
    let mut add = |name: &str, shape: Vec<usize>, s: usize| {
        let n = shape.iter().product();
        t.push((name.to_string(), shape, GgufType::F32, val(n, s)));
    };
    add("token_embd.weight", vec![vocab, d], 1);
    add("output_norm.weight", vec![d], 2);
    add("blk.0.attn_norm.weight", vec![d], 3);
    add("blk.0.attn_q.weight", vec![heads * dh, d], 4);
    add("blk.0.attn_k.weight", vec![dh, d], 5);
    add("blk.0.attn_v.weight", vec![dh, d], 6);
    add("blk.0.attn_output.weight", vec![d, heads * dh], 7);
    add("blk.0.ffn_norm.weight", vec![d], 8);
    add("blk.0.ffn_gate.weight", vec![ffn, d], 9);
    add("blk.0.ffn_up.weight", vec![ffn, d], 10);
    add("blk.0.ffn_down.weight", vec![d, ffn], 11);
    serialize_gguf(&m, &t).unwrap()
}

fn gguf_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "gguf";
    let bytes = tiny_llama_gguf(&[]);
    out.push(Case::new(f, "valid", bytes.clone()));
    truncations(f, "file", &bytes, 200 * scale, out);
    flips(f, "file", &bytes, 250 * scale, seed + 7, out);
    for key in [
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.vocab_size",
        "llama.rope.dimension_count",
    ] {
        for v in [0u64, 1, 3, 1 << 31, 1 << 32, u64::MAX] {
            out.push(Case::new(
                f,
                format!("{key} = {v}"),
                tiny_llama_gguf(&[(key, GgufValue::U64(v))]),
            ));
        }
    }
    // Header counts: tensors (bytes 8..16) and metadata entries (16..24).
    for (at, what) in [(8, "tensor count"), (16, "metadata count")] {
        for v in [0u64, 1 << 20, 1 << 40, u64::MAX] {
            let mut b = bytes.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            out.push(Case::new(f, format!("{what} = {v}"), b));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face config.json (GPT-2 and Llama) against fixed tiny GPT-2 tensors

fn gpt2_tensors(n_pos: usize) -> Tensors {
    let (d, v, f) = (4usize, 5usize, 16usize);
    let mut t = Tensors::new();
    let mut add = |name: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|i| ((i % 7) as f64 - 3.0) / 10.0).collect();
        t.insert(format!("transformer.{name}"), HostTensor::new(shape, data));
    };
    add("wte.weight", vec![v, d]);
    add("wpe.weight", vec![n_pos, d]);
    for ln in ["h.0.ln_1", "h.0.ln_2", "ln_f"] {
        add(&format!("{ln}.weight"), vec![d]);
        add(&format!("{ln}.bias"), vec![d]);
    }
    add("h.0.attn.c_attn.weight", vec![d, 3 * d]);
    add("h.0.attn.c_attn.bias", vec![3 * d]);
    add("h.0.attn.c_proj.weight", vec![d, d]);
    add("h.0.attn.c_proj.bias", vec![d]);
    add("h.0.mlp.c_fc.weight", vec![d, f]);
    add("h.0.mlp.c_fc.bias", vec![f]);
    add("h.0.mlp.c_proj.weight", vec![f, d]);
    add("h.0.mlp.c_proj.bias", vec![d]);
    t
}

pub const GPT2_CONFIG: &str = r#"{"model_type": "gpt2", "vocab_size": 5, "n_embd": 4, "n_head": 2,
 "n_layer": 1, "n_positions": 3, "n_inner": 16, "layer_norm_epsilon": 1e-5}"#;

fn hf_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "hf config.json";
    out.push(Case::new(f, "valid", GPT2_CONFIG.as_bytes().to_vec()));
    for key in [
        "vocab_size",
        "n_embd",
        "n_head",
        "n_layer",
        "n_positions",
        "n_inner",
        "layer_norm_epsilon",
        "head_dim",
        "max_position_embeddings",
    ] {
        for x in EXTREMES.iter().chain(&["null", "\"x\"", "1e308", "-1e308"]) {
            let v: serde_json::Value = serde_json::from_str(GPT2_CONFIG).unwrap();
            let mut v = v.as_object().unwrap().clone();
            v.insert(key.into(), serde_json::from_str(x).unwrap());
            out.push(Case::new(
                f,
                format!("gpt2 {key} = {x}"),
                serde_json::to_vec(&v).unwrap(),
            ));
        }
    }
    // Other families over the same (mismatching) tensors, with extreme sizes.
    for family in ["llama", "gpt_neo", "gpt_neox"] {
        for x in EXTREMES {
            out.push(Case::new(
                f,
                format!("{family} sizes {x}"),
                format!(
                    r#"{{"model_type": "{family}", "vocab_size": 5, "hidden_size": 4,
                  "num_attention_heads": 2, "num_heads": 2, "num_hidden_layers": {x},
                  "num_layers": {x}, "head_dim": {x}, "intermediate_size": 16,
                  "max_position_embeddings": {x}, "attention_types": [[["global"], {x}]]}}"#
                )
                .into_bytes(),
            ));
        }
    }
    truncations(f, "gpt2", GPT2_CONFIG.as_bytes(), 100 * scale, out);
    flips(
        f,
        "gpt2",
        GPT2_CONFIG.as_bytes(),
        150 * scale,
        seed + 3,
        out,
    );
}

// ---------------------------------------------------------------------------------------------
// IDX (MNIST) and CIFAR-10

fn idx_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "idx";
    let mut idx = vec![0, 0, 8, 3];
    for dim in [5u32, 4, 4] {
        idx.extend(dim.to_be_bytes());
    }
    idx.extend((0..80).map(|i| i as u8));
    out.push(Case::new(f, "valid", idx.clone()));
    truncations(f, "images", &idx, 100 * scale, out);
    flips(f, "images", &idx, 150 * scale, seed + 5, out);
    for x in [0u32, 1, 1 << 16, u32::MAX] {
        for at in [4, 8, 12] {
            let mut b = idx.clone();
            b[at..at + 4].copy_from_slice(&x.to_be_bytes());
            out.push(Case::new(f, format!("dim at byte {at} = {x}"), b));
        }
    }
    for magic in [
        [0u8, 0, 8, 0],
        [0, 0, 8, 255],
        [0, 0, 0x0d, 3],
        [0, 0, 1, 3],
    ] {
        let mut b = idx.clone();
        b[..4].copy_from_slice(&magic);
        out.push(Case::new(f, format!("magic {magic:?}"), b));
    }
}

fn cifar_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "cifar";
    let mut rec: Vec<u8> = Vec::new();
    for r in 0..3u8 {
        rec.push(r);
        rec.extend(std::iter::repeat_n(r, 3072));
    }
    out.push(Case::new(f, "valid", rec.clone()));
    truncations(f, "records", &rec, 60 * scale, out);
    flips(f, "records", &rec, 60 * scale, seed + 9, out);
    for label in [10u8, 255] {
        let mut b = rec.clone();
        b[0] = label;
        out.push(Case::new(f, format!("label {label}"), b));
    }
}

// ---------------------------------------------------------------------------------------------
// Text and TOML

fn text_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "text";
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    out.push(Case::new(f, "valid", text.clone().into_bytes()));
    truncations(f, "text", text.as_bytes(), 50 * scale, out);
    flips(f, "text", text.as_bytes(), 60 * scale, seed + 13, out);
    out.push(Case::new(f, "invalid UTF-8", vec![0xff; 64]));
    out.push(Case::new(f, "NUL bytes", vec![0; 64]));
}

pub const TOML: &str = r#"
[model]
kind = "mlp"
path = "model.pt"

[data]
kind = "modular_arithmetic"
modulus = 113

[lib]
node_layers = ["layers.0", "output"]
n_stochastic_sources_hidden = 4
batch_size = 64

[experiments]
schedule_cutoff = 20
schedule_base = 2.0
"#;

/// TOML mutations of issue 10 that must be refused naming the key: (from, to, key).
pub const TOML_REFUSED: [(&str, &str, &str); 8] = [
    (
        "schedule_base = 2.0",
        "schedule_base = 1.0",
        "[experiments] schedule_base",
    ),
    (
        "schedule_base = 2.0",
        "schedule_base = -2.0",
        "[experiments] schedule_base",
    ),
    (
        "schedule_base = 2.0",
        "schedule_base = nan",
        "[experiments] schedule_base",
    ),
    (
        "schedule_cutoff = 20",
        "schedule_cutoff = 1000000000000",
        "[experiments] schedule_cutoff",
    ),
    (
        "n_stochastic_sources_hidden = 4",
        "n_stochastic_sources_hidden = 1000000000",
        "[lib] n_stochastic_sources_hidden",
    ),
    ("modulus = 113", "modulus = 1000000", "[data] modulus"),
    ("batch_size = 64", "batch_size = 0", "[lib] batch_size"),
    (
        "batch_size = 64",
        "batch_size = 1000000000000",
        "[lib] batch_size",
    ),
];

fn toml_cases(scale: usize, seed: u64, out: &mut Vec<Case>) {
    let f = "toml";
    out.push(Case::new(f, "valid", TOML.as_bytes().to_vec()));
    truncations(f, "config", TOML.as_bytes(), 150 * scale, out);
    flips(f, "config", TOML.as_bytes(), 150 * scale, seed + 17, out);
    for (from, to, _) in TOML_REFUSED {
        out.push(Case::new(f, to, TOML.replace(from, to).into_bytes()));
    }
    for (from, values) in [
        ("modulus = 113", &["0", "1", "-1", "1e6", "\"x\""][..]),
        ("n_stochastic_sources_hidden = 4", &["0", "-3", "inf"][..]),
        (
            "schedule_cutoff = 20",
            &["0", "-1", "18446744073709551615"][..],
        ),
        ("schedule_base = 2.0", &["inf", "1e300", "0.5", "1"][..]),
    ] {
        let key = from.split(" = ").next().unwrap();
        for v in values {
            out.push(Case::new(
                f,
                format!("{key} = {v}"),
                TOML.replace(from, &format!("{key} = {v}")).into_bytes(),
            ));
        }
    }
}
