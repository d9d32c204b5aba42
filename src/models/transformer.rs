//! STUB
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TransformerOptions {}
pub fn transformer_from_tensors(
    _t: &crate::io::weights::Tensors,
    _o: &TransformerOptions,
    _f: &str,
) -> anyhow::Result<crate::models::Model> {
    anyhow::bail!("stub")
}
