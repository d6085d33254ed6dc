//! The GGUF container: metadata values, tensor infos, and the checked reader over a
//! memory map.

#[allow(unused_imports)]
use super::*;
// ---------------------------------------------------------------------------------------
// metadata
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        use MetaValue::*;
        match *self {
            U8(v) => Some(v as u64),
            U16(v) => Some(v as u64),
            U32(v) => Some(v as u64),
            U64(v) => Some(v),
            I8(v) if v >= 0 => Some(v as u64),
            I16(v) if v >= 0 => Some(v as u64),
            I32(v) if v >= 0 => Some(v as u64),
            I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        use MetaValue::*;
        match *self {
            U8(v) => Some(v as i64),
            U16(v) => Some(v as i64),
            U32(v) => Some(v as i64),
            U64(v) => i64::try_from(v).ok(),
            I8(v) => Some(v as i64),
            I16(v) => Some(v as i64),
            I32(v) => Some(v as i64),
            I64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// Short description for debugging (arrays summarized).
    pub fn summary(&self) -> String {
        match self {
            MetaValue::Str(s) if s.len() > 60 => format!(
                "{:?}... ({} bytes)",
                &s[..s.floor_char_boundary_compat(60)],
                s.len()
            ),
            MetaValue::Array(a) => format!("[array of {}]", a.len()),
            v => format!("{v:?}"),
        }
    }
}

pub(super) trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        if i >= self.len() {
            return self.len();
        }
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Absolute byte range in the file (checked to lie inside it).
    pub start: usize,
    pub nbytes: usize,
    pub n_elements: usize,
}

impl GgufTensorInfo {
    /// HF/row-major shape (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Byte cursor over the file with bounds-checked reads.
pub(super) struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata array elements still allowed (see [`MAX_META_ARRAY_ELEMENTS`]).
    array_budget: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::bad_model(self.path, msg)
    }
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated file: reading {what} at byte {} needs {n} bytes, only {} left (file is {} bytes)",
                self.pos,
                self.remaining(),
                self.data.len()
            ))),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "truncated or corrupt file: {what} at byte {} claims length {len}, only {} bytes left",
                self.pos,
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        // Token strings are sometimes not valid UTF-8 (partial byte pieces); keep them lossy.
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        })
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.arr(key)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => {
                let b = self.arr::<1>(key)?[0];
                if b > 1 {
                    return Err(self.err(format!("metadata {key:?}: bool value {b} is not 0 or 1")));
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("metadata {key:?}: arrays nested too deeply")));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                let min_size: u64 = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10 | 11 | 12 | 8 => 8,
                    9 => 12,
                    _ => {
                        return Err(self.err(format!(
                            "metadata {key:?}: unknown array element type {ety}"
                        )))
                    }
                };
                if n.checked_mul(min_size)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(self.err(format!(
                        "truncated or corrupt file: metadata {key:?} claims {n} array elements, only {} bytes left",
                        self.remaining()
                    )));
                }
                if n > self.array_budget {
                    return Err(self.err(format!(
                        "metadata {key:?} claims {n} array elements: more than the {} \
                         this reader accepts in one file (corrupt file?)",
                        MAX_META_ARRAY_ELEMENTS
                    )));
                }
                self.array_budget -= n;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.arr(key)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(self.err(format!("metadata {key:?}: unknown value type {t}"))),
        })
    }
}

/// A GGUF file's bytes: memory-mapped from disk, or owned (the browser build, where
/// they come from a fetch or a file picker).
pub(super) enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: header, metadata, tensor table, and the memory map.
pub struct GgufFile {
    pub(super) path: PathBuf,
    pub(super) mmap: FileBytes,
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: usize,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    pub(super) tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; as with every mmap-based loader, the file must not be
        // truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Self::parse(path, FileBytes::Mapped(mmap))
    }

    /// Parse a GGUF file held in memory; `name` stands in for its path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(name.into(), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, mmap: FileBytes) -> Result<GgufFile> {
        let (version, alignment, data_offset, metadata, tensors) = {
            let mut c = Cursor {
                data: &mmap[..],
                pos: 0,
                path: &path,
                array_budget: MAX_META_ARRAY_ELEMENTS,
            };
            if c.data.len() < 4 {
                return Err(c.err(format!("not a GGUF file: only {} bytes long", c.data.len())));
            }
            let magic = c.arr::<4>("magic")?;
            if magic != GGUF_MAGIC {
                return Err(c.err(format!(
                    "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
                    String::from_utf8_lossy(&magic)
                )));
            }
            let version = c.u32("version")?;
            if version != 2 && version != 3 {
                return Err(c.err(format!(
                    "unsupported GGUF version {version} (supported: 2, 3)"
                )));
            }
            let n_tensors = c.u64("tensor count")?;
            let n_kv = c.u64("metadata count")?;
            // Each metadata entry takes at least 8 (key len) + 4 (type) + 1 bytes, each tensor
            // info at least 8 + 4 + 4 + 8 bytes.
            if n_kv
                .checked_mul(13)
                .is_none_or(|b| b > c.remaining() as u64)
            {
                return Err(c.err(format!(
                    "corrupt or truncated header: {n_kv} metadata entries cannot fit in {} bytes",
                    c.remaining()
                )));
            }
            if n_tensors
                .checked_mul(24)
                .is_none_or(|b| b > c.remaining() as u64)
            {
                return Err(c.err(format!(
                    "corrupt or truncated header: {n_tensors} tensor infos cannot fit in {} bytes",
                    c.remaining()
                )));
            }
            let mut metadata = Vec::with_capacity(n_kv as usize);
            for i in 0..n_kv {
                let key = c.string(&format!("metadata key #{i}"))?;
                let ty = c.u32(&key)?;
                let v = c.value(ty, &key, 0)?;
                metadata.push((key, v));
            }
            let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some((_, v)) => match v.as_u64() {
                    Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                    _ => {
                        return Err(c.err(format!(
                            "general.alignment {} is not a power of two",
                            v.summary()
                        )))
                    }
                },
            };
            let mut raw = Vec::with_capacity(n_tensors as usize);
            for i in 0..n_tensors {
                let name = c.string(&format!("tensor #{i} name"))?;
                let nd = c.u32(&name)?;
                if nd == 0 || nd > MAX_DIMS {
                    return Err(c.err(format!("tensor {name:?}: bad number of dimensions {nd}")));
                }
                let mut dims = Vec::with_capacity(nd as usize);
                for _ in 0..nd {
                    dims.push(c.u64(&name)?);
                }
                let tid = c.u32(&name)?;
                let ty = GgmlType::from_id(tid)
                    .ok_or_else(|| c.err(format!("tensor {name:?}: unknown ggml type id {tid}")))?;
                let offset = c.u64(&name)?;
                raw.push((name, dims, ty, offset));
            }
            let end_of_header = c.pos as u64;
            let data_offset = end_of_header.div_ceil(alignment) * alignment;
            let file_len = c.data.len() as u64;
            if data_offset > file_len && !raw.is_empty() {
                return Err(c.err(format!(
                    "truncated file: tensor data section would start at byte {data_offset}, file is {file_len} bytes"
                )));
            }
            let mut tensors = Vec::with_capacity(raw.len());
            for (name, dims, ty, offset) in raw {
                let mut n: u64 = 1;
                for &d in &dims {
                    n = n.checked_mul(d).ok_or_else(|| {
                        c.err(format!("tensor {name:?}: dimensions {dims:?} overflow"))
                    })?;
                }
                let (bs, bb) = ty.block_layout();
                if dims[0] % bs as u64 != 0 {
                    return Err(c.err(format!(
                        "tensor {name:?}: first dimension {} is not a multiple of the {ty} block size {bs}",
                        dims[0]
                    )));
                }
                let nbytes = (n / bs as u64)
                    .checked_mul(bb as u64)
                    .ok_or_else(|| c.err(format!("tensor {name:?}: size overflows")))?;
                if offset % alignment != 0 {
                    return Err(c.err(format!(
                        "tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"
                    )));
                }
                let start = data_offset.checked_add(offset);
                let end = start.and_then(|s| s.checked_add(nbytes));
                match (start, end) {
                    (Some(s), Some(e)) if e <= file_len => tensors.push(GgufTensorInfo {
                        name,
                        dims,
                        ty,
                        offset,
                        start: s as usize,
                        nbytes: nbytes as usize,
                        n_elements: n as usize,
                    }),
                    _ => {
                        return Err(c.err(format!(
                            "truncated or corrupt file: tensor {name:?} ({ty}, {nbytes} bytes at data offset {offset}) extends past the end of the file ({file_len} bytes)"
                        )))
                    }
                }
            }
            (version, alignment, data_offset as usize, metadata, tensors)
        };
        let mut meta_index = HashMap::with_capacity(metadata.len());
        for (i, (k, _)) in metadata.iter().enumerate() {
            if meta_index.insert(k.clone(), i).is_some() {
                return Err(Error::bad_model(
                    &path,
                    format!("duplicate metadata key {k:?}"),
                ));
            }
        }
        let mut tensor_index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if tensor_index.insert(t.name.clone(), i).is_some() {
                return Err(Error::bad_model(
                    &path,
                    format!("duplicate tensor {:?}", t.name),
                ));
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }
    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, gguf_name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(gguf_name).map(|&i| &self.tensors[i])
    }
    /// Raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> &[u8] {
        self.mmap.get(t.start..t.start + t.nbytes).unwrap_or(&[])
    }
    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[..]
    }
    /// Dequantize a tensor (by GGUF name) to f32, in ggml element order.
    pub fn dequantize(&self, gguf_name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(gguf_name).ok_or_else(|| {
            Error::bad_model(&self.path, format!("no tensor named {gguf_name:?}"))
        })?;
        self.dequantize_info(t)
    }
    pub(super) fn dequantize_info(&self, t: &GgufTensorInfo) -> Result<Vec<f32>> {
        if !t.ty.can_dequantize() {
            return Err(Error::Unsupported(format!(
                "tensor {:?} in {} has ggml type {}, which this engine cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                t.name,
                self.path.display(),
                t.ty
            )));
        }
        dequantize(t.ty, self.tensor_bytes(t), t.n_elements)
            .map_err(|e| Error::bad_model(&self.path, format!("tensor {:?}: {e}", t.name)))
    }
}
