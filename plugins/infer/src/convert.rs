//! Model preparation: rewrite GGUF weights into Q8_0, for which candle has AVX2 kernels (it has
//! none for Q4_1, which then runs on scalar code). The output is deterministic (metadata and
//! tensors written in sorted order), cached beside the source weights, and keyed by the source's
//! sha256 plus the target, so it is converted once per machine.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

/// Bump when the conversion would produce different bytes.
pub const CONVERTER_VERSION: u32 = 1;

/// GGUF `general.file_type` for "mostly Q8_0".
const FILE_TYPE_Q8_0: u32 = 7;

pub fn converted_path(source: &Path) -> PathBuf {
    let stem = source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    source.with_file_name(format!("{stem}.to-{}.gguf", crate::Prepare::Q8_0.spelling()))
}

/// Convert `source` to Q8_0 at [`converted_path`] unless it is already there.
pub fn to_q8_0(source: &Path) -> Result<PathBuf, String> {
    let target = converted_path(source);
    if target.is_file() {
        return Ok(target);
    }
    let err = |e: candle_core::Error| format!("converting {} to Q8_0: {e}", source.display());
    // Buffered: the metadata is parsed field by field, each a system call on a bare file.
    let mut reader = BufReader::new(File::open(source).map_err(|e| format!("{}: {e}", source.display()))?);
    let content = gguf_file::Content::read(&mut reader).map_err(err)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content.tensor(&mut reader, name, &Device::Cpu).map_err(err)?;
        let tensor = match tensor.dtype() {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                QTensor::quantize(&tensor.dequantize(&Device::Cpu).map_err(err)?, GgmlDType::Q8_0).map_err(err)?
            }
            _ => tensor,
        };
        tensors.push((name.clone(), tensor));
    }
    let file_type = gguf_file::Value::U32(FILE_TYPE_Q8_0);
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), if k == "general.file_type" { &file_type } else { v }))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let tmp = target.with_extension(format!("part-{}", std::process::id()));
    let result = (|| {
        let mut out = BufWriter::new(File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut out, &metadata, &refs).map_err(err)?;
        out.into_inner().map_err(|e| e.to_string())?.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| target)
}
