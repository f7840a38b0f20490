//! Tensors as a PyTorch checkpoint describes them: an element type, a shape and strides over a storage.

/// Element types that both a PyTorch storage and safetensors can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl Dtype {
    /// The dtype of a legacy typed storage class (`torch.BFloat16Storage`, …), as the pickle names it.
    pub fn from_storage_class(name: &str) -> Option<Dtype> {
        Some(match name {
            "BoolStorage" => Dtype::Bool,
            "ByteStorage" => Dtype::U8,
            "CharStorage" => Dtype::I8,
            "ShortStorage" => Dtype::I16,
            "IntStorage" => Dtype::I32,
            "LongStorage" => Dtype::I64,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
        }
    }
}

/// A storage named by a pickle's persistent id: the archive entry `data/<key>` holding `numel` elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: Dtype,
    pub numel: u64,
}

/// A tensor: a strided view (element offset, sizes, strides) into a storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

impl TensorRef {
    /// Builds a view, or says why the numbers cannot describe one (ranks differ, or sizes overflow).
    pub fn new(storage: StorageRef, offset: u64, shape: Vec<u64>, stride: Vec<u64>) -> Result<Self, String> {
        if shape.len() != stride.len() {
            return Err(format!("size has {} dimensions but stride has {}", shape.len(), stride.len()));
        }
        let tensor = TensorRef { storage, offset, shape, stride };
        let bytes = tensor.checked_numel().and_then(|n| n.checked_mul(tensor.storage.dtype.size() as u64));
        if bytes.is_none() || tensor.extent().is_none() {
            return Err(format!("size {:?} with stride {:?} overflows", tensor.shape, tensor.stride));
        }
        Ok(tensor)
    }

    /// Elements in the view (checked: `None` on overflow).
    fn checked_numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, &s| acc.checked_mul(s))
    }

    /// Elements in the view; `new` checked that the product fits.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of the contiguous copy.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.storage.dtype.size() as u64
    }

    /// One past the last storage element the view touches (the offset when it touches none).
    pub fn extent(&self) -> Option<u64> {
        if self.shape.contains(&0) {
            return Some(self.offset);
        }
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d)))?;
        last.checked_add(1)
    }

    /// The view as few (size, stride) dimensions as describe it: sizes of 1 dropped and a dimension merged into
    /// the one before it when the pair walks memory evenly. A contiguous view becomes `[(numel, 1)]`.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        let mut dims: Vec<(u64, u64)> = Vec::with_capacity(self.shape.len());
        for (&n, &s) in self.shape.iter().zip(&self.stride) {
            if n == 1 {
                continue;
            }
            match dims.last_mut() {
                Some(last) if n.checked_mul(s) == Some(last.1) => *last = (last.0 * n, s),
                _ => dims.push((n, s)),
            }
        }
        if dims.is_empty() {
            dims.push((1, 1));
        }
        dims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(offset: u64, shape: &[u64], stride: &[u64]) -> TensorRef {
        let storage = StorageRef { key: "0".into(), dtype: Dtype::BF16, numel: 1000 };
        TensorRef::new(storage, offset, shape.to_vec(), stride.to_vec()).unwrap()
    }

    #[test]
    fn layout_merges_contiguous_runs_and_keeps_strided_ones() {
        assert_eq!(view(0, &[4, 6, 5], &[30, 5, 1]).layout(), vec![(120, 1)]);
        assert_eq!(view(3, &[6, 4], &[1, 6]).layout(), vec![(6, 1), (4, 6)]);
        assert_eq!(view(0, &[2, 1, 3], &[9, 100, 2]).layout(), vec![(2, 9), (3, 2)]);
        assert_eq!(view(0, &[3, 4], &[0, 1]).layout(), vec![(3, 0), (4, 1)]);
        assert_eq!(view(7, &[], &[]).layout(), vec![(1, 1)]);
    }

    #[test]
    fn extent_and_sizes() {
        let t = view(5, &[3, 4], &[10, 2]);
        assert_eq!(t.extent(), Some(5 + 20 + 6 + 1));
        assert_eq!((t.numel(), t.nbytes()), (12, 24));
        assert_eq!(view(5, &[0, 4], &[4, 1]).extent(), Some(5));
        assert_eq!(view(0, &[], &[]).numel(), 1);
    }

    #[test]
    fn overflowing_views_are_refused() {
        let storage = StorageRef { key: "0".into(), dtype: Dtype::F32, numel: 1 };
        assert!(TensorRef::new(storage.clone(), 0, vec![1 << 40, 1 << 40], vec![1, 1]).is_err());
        assert!(TensorRef::new(storage.clone(), u64::MAX, vec![2], vec![1]).is_err());
        assert!(TensorRef::new(storage, 0, vec![2], vec![]).is_err());
    }
}
