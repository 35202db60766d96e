use candle_core::{Result, Tensor};

use super::NormalCache;

#[derive(Debug, Clone)]
pub struct SingleCache {
    // all_data is an option on a Tensor, this makes it possible to only create the actual tensor
    // on the first call where the batch size is easily known.
    // Also this makes it safe to clone a KvCache that has been reset (as in it will not share
    // its internal state with the cloned instance).
    pub all_data: Option<Tensor>,
    pub dim: usize,
    pub current_seq_len: usize,
    pub capacity_seq_len: usize,
    pub max_seq_len: usize,
    /// Local change (vendor/README.md): the length of each batch row when the rows' lengths
    /// differ (a batch of decoding sequences of different lengths, right-padded); `None` when
    /// every row is `current_seq_len` long, as upstream has it. `current_seq_len` is then the
    /// longest row.
    pub row_lens: Option<Vec<usize>>,
}

impl SingleCache {
    pub fn new(dim: usize, max_seq_len: usize, capacity_seq_len: usize) -> Self {
        Self {
            all_data: None,
            dim,
            current_seq_len: 0,
            max_seq_len,
            capacity_seq_len,
            row_lens: None,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn current_seq_len(&self) -> usize {
        self.current_seq_len
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    pub fn all_data(&self) -> Option<&Tensor> {
        self.all_data.as_ref()
    }

    pub fn current_data(&self) -> Result<Option<Tensor>> {
        let data = match self.all_data.as_ref() {
            None => None,
            Some(d) => Some(d.narrow(self.dim, 0, self.current_seq_len)?),
        };
        Ok(data)
    }

    pub fn reset(&mut self) {
        self.current_seq_len = 0;
        self.all_data = None;
        self.row_lens = None;
    }

    pub fn try_set_len(&self, len: usize) -> candle_core::Result<()> {
        if len > self.capacity_seq_len {
            candle_core::bail!(
                "kv-cache: requested length ({}) exceeds current capacity ({})",
                len,
                self.capacity_seq_len
            );
        }
        Ok(())
    }

    pub fn set_len(&mut self, len: usize) -> candle_core::Result<()> {
        if self.row_lens.is_some() {
            candle_core::bail!("kv-cache: set_len on a batch whose rows have different lengths");
        }
        self.try_set_len(len)?;
        self.current_seq_len = len;
        Ok(())
    }

    pub fn append(&mut self, src: &Tensor) -> Result<()> {
        if self.row_lens.is_some() {
            return self.append_rows(src);
        }
        let seq_len = src.dim(self.dim)?;
        self.reserve(src, seq_len)?;
        let ad = self.all_data.as_mut().unwrap();

        ad.slice_set(src, self.dim, self.current_seq_len)?;
        self.current_seq_len += seq_len;
        Ok(())
    }

    /// Local change (vendor/README.md): appends one position to each row of a batch whose rows
    /// have different lengths, each at its own row's end (`row_lens`), so that every row holds
    /// exactly what it holds when its sequence runs alone. Decode steps only (one new position).
    fn append_rows(&mut self, src: &Tensor) -> Result<()> {
        let seq_len = src.dim(self.dim)?;
        if seq_len != 1 || self.dim == 0 {
            candle_core::bail!("kv-cache: rows of different lengths take one new position each, got {seq_len}");
        }
        let mut lens = self.row_lens.clone().unwrap();
        if lens.len() != src.dim(0)? {
            candle_core::bail!("kv-cache: {} row lengths for a batch of {}", lens.len(), src.dim(0)?);
        }
        self.reserve(src, seq_len)?;
        let ad = self.all_data.as_ref().unwrap();
        for (row, len) in lens.iter_mut().enumerate() {
            ad.narrow(0, row, 1)?.slice_set(&src.narrow(0, row, 1)?, self.dim, *len)?;
            *len += seq_len;
        }
        self.current_seq_len = lens.iter().copied().max().unwrap_or(0);
        self.row_lens = Some(lens);
        Ok(())
    }

    /// Makes room for `seq_len` more positions after `current_seq_len` (the longest row).
    fn reserve(&mut self, src: &Tensor, seq_len: usize) -> Result<()> {
        // This doesn't seem very idiomatic but because the creation can fail, it's tricky to use
        // self.all_data.get_or_insert_with.
        if self.all_data.is_none() {
            let mut shape = src.dims().to_vec();
            shape[self.dim] = self.capacity_seq_len;
            let ad = Tensor::zeros(shape, src.dtype(), src.device())?;
            self.all_data = Some(ad);
        };

        // Expand kv cache
        if self.current_seq_len + seq_len > self.capacity_seq_len {
            let diff = self.current_seq_len + seq_len - self.capacity_seq_len;
            let n_blocks_needed = diff.div_ceil(NormalCache::CACHE_GROW_SIZE);
            self.capacity_seq_len += n_blocks_needed * NormalCache::CACHE_GROW_SIZE;
            // Local change (vendor/README.md): growth stops at the model's limit when what is
            // needed fits under it (a batch's capacity need not be a multiple of the step).
            if self.capacity_seq_len > self.max_seq_len && self.current_seq_len + seq_len <= self.max_seq_len {
                self.capacity_seq_len = self.max_seq_len;
            }
            if self.capacity_seq_len > self.max_seq_len {
                candle_core::bail!(
                    "kv-cache: requested capacity ({}) above max seq len ({})",
                    self.capacity_seq_len,
                    self.max_seq_len
                )
            }
            let mut shape = src.dims().to_vec();
            shape[self.dim] = self.capacity_seq_len;
            let ad = Tensor::zeros(shape, src.dtype(), src.device())?;
            ad.slice_set(self.all_data.as_ref().unwrap(), self.dim, 0)?;
            self.all_data = Some(ad);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Local change (vendor/README.md): a cache whose capacity is not a multiple of the growth
    /// step (a batch's, mistralrs-core 14) grows up to the model's limit, not past it into an
    /// error, holds what was appended, and refuses one position more.
    #[test]
    fn growth_stops_at_max_seq_len() {
        let (max_seq_len, capacity) = (600, 128);
        let mut cache = SingleCache::new(2, max_seq_len, capacity);
        let positions = |n: usize, from: usize| {
            let values: Vec<f32> = (from..from + n).map(|p| p as f32).collect();
            Tensor::from_vec(values, (1, 1, n, 1), &Device::Cpu).unwrap()
        };
        cache.append(&positions(100, 0)).unwrap();
        // 100 + 450 needs 550: one step of 512 from 128 would be 640, past 600.
        cache.append(&positions(450, 100)).unwrap();
        assert_eq!(cache.capacity_seq_len, max_seq_len);
        cache.append(&positions(50, 550)).unwrap();
        let held: Vec<f32> = cache.current_data().unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(held, (0..600).map(|p| p as f32).collect::<Vec<_>>());
        assert!(cache.append(&positions(1, 600)).is_err(), "past max_seq_len");
    }
}
