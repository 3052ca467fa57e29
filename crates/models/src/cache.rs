//! The key/value cache of [`Llama::forward_cached`](crate::Llama::forward_cached).

use burn::tensor::Tensor;

use crate::config::LlamaConfig;

/// One block's cached keys and values, `[batch, len, kv_heads·head_dim]` each (the projections'
/// layout, as the attention reads them), rotated and in the compute dtype.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    keys: Option<Tensor<3>>,
    values: Option<Tensor<3>>,
    len: usize,
    /// Positions to preallocate (0: grow by concatenation).
    capacity: usize,
}

impl LayerCache {
    /// Appends `k` and `v` (`[batch, seq, kv_heads·head_dim]`) and returns all cached keys and
    /// values, the new ones included.
    pub fn append(&mut self, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let [b, s, f] = k.dims();
        let end = self.len + s;
        if end > self.capacity {
            // Concatenation; also the fallback, from then on, when a buffer is outgrown.
            self.capacity = 0;
            let grow = |old: Option<Tensor<3>>, new: Tensor<3>| match old {
                Some(old) => Tensor::cat(vec![old.narrow(1, 0, self.len), new], 1),
                None => new,
            };
            let (k, v) = (grow(self.keys.take(), k), grow(self.values.take(), v));
            self.len = end;
            self.keys = Some(k.clone());
            self.values = Some(v.clone());
            return (k, v);
        }
        let alloc = |new: &Tensor<3>| {
            Tensor::<3>::zeros([b, self.capacity, f], (&new.device(), new.dtype()))
        };
        let keys = self.keys.take().unwrap_or_else(|| alloc(&k));
        let values = self.values.take().unwrap_or_else(|| alloc(&v));
        let range = [0..b, self.len..end, 0..f];
        let keys = keys.slice_assign(range.clone(), k);
        let values = values.slice_assign(range, v);
        self.len = end;
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        (keys.narrow(1, 0, end), values.narrow(1, 0, end))
    }

    /// The number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first append.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Keys and values of every block for a batch of sequences, with the number of cached positions
/// and the padding mask of the cached tokens, for incremental decoding with
/// [`Llama::forward_cached`](crate::Llama::forward_cached).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) config: LlamaConfig,
    pub(crate) batch: usize,
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) len: usize,
    /// `[batch, len]`, 1 for real tokens and 0 for padding; `None` while nothing is padded.
    pub(crate) padding: Option<Vec<i64>>,
}

impl KvCache {
    /// An empty cache for `batch` sequences of a model with `config`; keys and values grow by
    /// concatenation along the sequence.
    pub fn new(config: &LlamaConfig, batch: usize) -> Self {
        Self::with_capacity(config, batch, 0)
    }

    /// An empty cache whose buffers hold `capacity` positions, written in place
    /// (`slice_assign`); it falls back to concatenation beyond `capacity`. On flex, at 32 + 32
    /// positions of a 4-layer model (benches/benches/llama.rs), both strategies decode at the
    /// same speed within noise, so [`generate`](crate::generate()) uses [`KvCache::new`].
    pub fn with_capacity(config: &LlamaConfig, batch: usize, capacity: usize) -> Self {
        let layer = LayerCache {
            capacity,
            ..LayerCache::default()
        };
        Self {
            config: config.clone(),
            batch,
            layers: vec![layer; config.num_hidden_layers],
            len: 0,
            padding: None,
        }
    }

    /// The number of cached positions (prompt padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch size the cache was made for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Each block's cache, in layer order.
    pub fn layers(&self) -> &[LayerCache] {
        &self.layers
    }
}
