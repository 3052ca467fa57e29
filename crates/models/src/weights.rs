//! Hugging Face safetensors: `model.safetensors` or a sharded `model.safetensors.index.json`,
//! f32/f16/bf16 on disk, cast to the dtype the caller asks for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};
use crate::source::Init;
use crate::source::ParamSource;

/// Reads a text file of at most `cap` bytes. A device, a pipe that never ends (`/dev/zero`) or
/// a file far bigger than any config is an error, not a read that fills the memory.
pub fn read_text_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if file.metadata()?.is_dir() {
        return Err(std::io::Error::other("is a folder, not a file"));
    }
    let mut text = String::new();
    file.take(cap + 1)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => std::io::Error::other("not UTF-8 text"),
            _ => e,
        })?;
    if text.len() as u64 > cap {
        return Err(std::io::Error::other(format!(
            "more than the {} MB kiln reads from such a file",
            cap >> 20
        )));
    }
    Ok(text)
}

/// The most bytes kiln reads from a JSON or TOML config file.
pub const CONFIG_CAP: u64 = 64 << 20;

/// Opens `path` for a memory map: it must be a regular file (mapping a folder or a device
/// fails with a bare `No such device`).
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a folder, device or pipe)",
        ));
    }
    Ok(file)
}

/// One memory-mapped safetensors file, its header checked once when opened.
struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io {
            path: path.into(),
            source,
        };
        let file = open_regular(path).map_err(io)?;
        // SAFETY: the map is read-only and checkpoints are not modified while a model loads from them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let this = Self {
            path: path.into(),
            map,
        };
        this.tensors()?;
        Ok(this)
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| ModelError::Safetensors {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

/// Parameters read from HF safetensors files; every key must be asked for exactly once
/// (see [`SafetensorsSource::finish`]).
pub struct SafetensorsSource {
    files: Vec<MappedFile>,
    /// key -> index into `files`.
    index: HashMap<String, usize>,
    used: BTreeSet<String>,
    device: Device,
    dtype: DType,
    name: String,
}

impl SafetensorsSource {
    /// Opens a model folder (`model.safetensors` or `model.safetensors.index.json`), or one file.
    pub fn open(path: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let path = path.as_ref();
        let (name, paths) = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.exists() {
                (index.clone(), shard_paths(&index)?)
            } else {
                let single = path.join("model.safetensors");
                (single.clone(), vec![single])
            }
        } else if path.extension().is_some_and(|e| e == "json") {
            (path.into(), shard_paths(path)?)
        } else {
            (path.into(), vec![path.into()])
        };
        let files = paths
            .iter()
            .map(|p| MappedFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            for key in file.tensors()?.names() {
                index.insert(key.to_string(), i);
            }
        }
        Ok(Self {
            files,
            index,
            used: BTreeSet::new(),
            device: device.clone(),
            dtype,
            name: name.display().to_string(),
        })
    }

    /// Errors if the files hold tensors the model never asked for.
    pub fn finish(self) -> Result<()> {
        let mut unexpected: Vec<String> = self
            .index
            .into_keys()
            .filter(|k| !self.used.contains(k))
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        unexpected.sort();
        Err(ModelError::UnexpectedKeys {
            keys: unexpected,
            source_name: self.name,
        })
    }

    /// The raw tensor `key` (float or integer) with its shape, without shape expectations.
    pub fn data(&self, key: &str) -> Result<TensorData> {
        let missing = || ModelError::MissingKey {
            key: key.into(),
            expected: vec![],
            source_name: self.name.clone(),
        };
        let file = &self.files[*self.index.get(key).ok_or_else(missing)?];
        let tensors = file.tensors()?;
        let view = tensors.tensor(key).map_err(|_| missing())?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    key: key.into(),
                    dtype: format!("{other:?}"),
                    source_name: file.path.display().to_string(),
                });
            }
        };
        Ok(TensorData::from_bytes_vec(
            view.data().to_vec(),
            view.shape().to_vec(),
            dtype,
        ))
    }
}

impl ParamSource for SafetensorsSource {
    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        _init: Init,
    ) -> Result<Tensor<D>> {
        let data = self.data(key).map_err(|e| match e {
            ModelError::MissingKey {
                key, source_name, ..
            } => ModelError::MissingKey {
                key,
                expected: shape.to_vec(),
                source_name,
            },
            other => other,
        })?;
        if data.shape().as_slice() != shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                key: key.into(),
                expected: shape.to_vec(),
                found: data.shape().to_vec(),
                source_name: self.name.clone(),
            });
        }
        if !matches!(
            data.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(ModelError::NotFloat {
                key: key.into(),
                dtype: format!("{:?}", data.dtype()),
                source_name: self.name.clone(),
            });
        }
        if let Some((index, value)) = first_non_finite(&data) {
            return Err(ModelError::NonFinite {
                key: key.into(),
                index,
                value,
                source_name: self.name.clone(),
            });
        }
        self.used.insert(key.to_string());
        Ok(Tensor::from_data(
            data.convert_dtype(self.dtype),
            (&self.device, self.dtype),
        ))
    }
}

/// The first element of a float tensor that is NaN or infinite once read as f32 (an f64 beyond
/// f32's range counts: it would become inf in the model), with its flat index.
pub fn first_non_finite(data: &TensorData) -> Option<(usize, f32)> {
    if !matches!(
        data.dtype(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64
    ) {
        return None;
    }
    data.iter::<f32>().enumerate().find(|(_, v)| !v.is_finite())
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = read_text_capped(index, CONFIG_CAP).map_err(|source| ModelError::Io {
        path: index.into(),
        source,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.into(),
        source,
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&String> = parsed.weight_map.values().collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Every float parameter of a module with its path (`model.layers.0.mlp.up_proj.weight`), in
/// module order. For kiln's models the path is the HF name.
pub fn named_tensors<M: Module>(module: &M) -> Vec<(String, TensorData)> {
    struct Collect {
        path: Vec<String>,
        out: Vec<(String, TensorData)>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out
                .push((self.path.join("."), param.val().into_data()));
        }
    }
    let mut collect = Collect {
        path: vec![],
        out: vec![],
    };
    module.visit(&mut collect);
    collect.out
}

/// Writes tensors as one safetensors file in `dtype`, atomically (temporary file, then rename):
/// a crash leaves either the old file or the complete new one.
pub fn save_safetensors(
    tensors: &[(String, TensorData)],
    dtype: DType,
    path: impl AsRef<Path>,
) -> Result<()> {
    let layout: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape().to_vec()))
        .collect();
    write_safetensors(path, &layout, dtype, |i| Ok(tensors[i].1.clone()))
}

/// Writes a safetensors file tensor by tensor: `layout` names each tensor and its shape, in
/// file order, and `value(i)` is asked for tensor `i` only when it is written (then dropped),
/// so a caller holds one tensor at a time, never the whole model. Values are cast to `dtype`.
/// The header carries `{"format": "pt"}` as transformers writes it. Atomic, as
/// [`save_safetensors`].
pub fn write_safetensors<E: From<ModelError>>(
    path: impl AsRef<Path>,
    layout: &[(String, Vec<usize>)],
    dtype: DType,
    mut value: impl FnMut(usize) -> std::result::Result<TensorData, E>,
) -> std::result::Result<(), E> {
    use std::io::Write as _;
    let path = path.as_ref();
    let (st_dtype, size) = match dtype {
        DType::F32 => ("F32", 4),
        DType::F16 => ("F16", 2),
        DType::BF16 => ("BF16", 2),
        other => return Err(ModelError::Input(format!("cannot save dtype {other:?}")).into()),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut at = 0usize;
    for (name, shape) in layout {
        let bytes = shape.iter().product::<usize>() * size;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // Data starts 8-byte aligned, as the safetensors library pads it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io {
            path: path.clone(),
            source,
        }
    };
    let tmp = path.with_extension("safetensors.tmp");
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(&header))
        .map_err(io(&tmp))?;
    for (i, (name, shape)) in layout.iter().enumerate() {
        let data = value(i)?.convert_dtype(dtype);
        if data.shape().to_vec() != *shape {
            return Err(ModelError::Input(format!(
                "tensor `{name}`: shape {:?}, the layout says {shape:?}",
                data.shape()
            ))
            .into());
        }
        w.write_all(data.as_bytes()).map_err(io(&tmp))?;
    }
    let file = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}
