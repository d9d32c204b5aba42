//! Named tensors in safetensors files (weights and results), read as f64 from F64, F32, F16 or
//! BF16 and written as F64 or F32.

use crate::tensor::HostTensor;
use anyhow::{bail, Context};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

pub type Tensors = BTreeMap<String, HostTensor>;

/// Reads every tensor of a safetensors file as f64.
pub fn load_safetensors(path: &Path) -> anyhow::Result<Tensors> {
    let bytes = crate::io::read_file(path)?;
    parse_safetensors(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))
}

pub fn parse_safetensors(bytes: &[u8]) -> anyhow::Result<Tensors> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = Tensors::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            other => bail!("tensor {name}: unsupported dtype {other:?}"),
        };
        out.insert(name, HostTensor::new(view.shape().to_vec(), values));
    }
    Ok(out)
}

/// IEEE half to f64.
pub fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 => {
            if frac == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Serialises tensors as F64 (`f32 = false`) or F32, with optional string metadata.
pub fn serialize_safetensors(
    tensors: &Tensors,
    f32: bool,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    let buffers: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let bytes: Vec<u8> = if f32 {
                t.data
                    .iter()
                    .flat_map(|v| (*v as f32).to_le_bytes())
                    .collect()
            } else {
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
            };
            (k.clone(), bytes, t.shape.clone())
        })
        .collect();
    let dtype = if f32 { Dtype::F32 } else { Dtype::F64 };
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(k, b, s)| {
            Ok((
                k.clone(),
                TensorView::new(dtype, s.clone(), b).map_err(|e| anyhow::anyhow!("{k}: {e}"))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Writes tensors to `path` atomically.
pub fn save_safetensors(path: &Path, tensors: &Tensors, f32: bool) -> anyhow::Result<()> {
    let bytes = serialize_safetensors(tensors, f32, None)?;
    super::write_atomic(path, &bytes)
}

/// Fetches a tensor by name, checking its shape; errors name the tensor and the file.
pub fn take<'a>(
    tensors: &'a Tensors,
    name: &str,
    shape: &[usize],
    file: &str,
) -> anyhow::Result<&'a HostTensor> {
    let t = tensors
        .get(name)
        .with_context(|| format!("{file}: missing tensor `{name}`"))?;
    if t.shape != shape {
        bail!(
            "{file}: tensor `{name}` has shape {:?}, expected {:?}",
            t.shape,
            shape
        );
    }
    if t.data.iter().any(|v| !v.is_finite()) {
        bail!("{file}: tensor `{name}` contains NaN or infinity");
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f64_and_f32() {
        let mut t = Tensors::new();
        t.insert(
            "a".into(),
            HostTensor::new(vec![2, 3], vec![1.0, -2.5, 3.0, 1e-300, 0.1, 7.0]),
        );
        let back = parse_safetensors(&serialize_safetensors(&t, false, None).unwrap()).unwrap();
        assert_eq!(back, t);
        let back32 = parse_safetensors(&serialize_safetensors(&t, true, None).unwrap()).unwrap();
        assert_eq!(back32["a"].data[4], 0.1f32 as f64);
    }

    #[test]
    fn f16_decoding() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
    }

    #[test]
    fn truncated_file_is_an_error() {
        let mut t = Tensors::new();
        t.insert("a".into(), HostTensor::new(vec![4], vec![1.0; 4]));
        let bytes = serialize_safetensors(&t, false, None).unwrap();
        assert!(parse_safetensors(&bytes[..bytes.len() - 3]).is_err());
    }
}
