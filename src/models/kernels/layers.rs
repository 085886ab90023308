//! The post-norm transformer layers every architecture shares, and how a batch runs through them on the
//! engine's team of threads.
//!
//! A batch runs unpadded: the dense layers work on the packed `[tokens, hidden]` rows of all its sequences,
//! attention runs per sequence. The team shares the work in one of two ways:
//!
//! - **split** (a single input, a small batch, one long input among short ones): every member keeps its
//!   own copy of the hidden states and takes a share of each layer: the query/key/value columns of its
//!   heads and their attention, then the attention output projection over *its heads' inputs only* (a
//!   partial sum over the inputs, full width); the members meet at one barrier, and each adds all partial
//!   sums, the bias and the residual and takes the layer norm of every row itself. The MLP goes the same
//!   way: the member's share of the intermediate columns, then the output projection over those inputs
//!   only, one barrier, the sum and the norm. So a layer costs two barriers, each member streams only its
//!   share of the weights (what bounds a short input), and no member waits for another's layer norm.
//! - **groups** (a batch of many inputs): the sequences are dealt out by cost and each member runs its
//!   group through all layers alone, with no barrier at all.
//!
//! Nothing is allocated per batch: each member's buffers are kept between batches (see [`Stack::run`]).

use std::sync::atomic::{AtomicPtr, Ordering::SeqCst};
use std::sync::Mutex;

use super::attention::{self, Heads, Rotary};
use super::gemm::{self, Epilogue, Packed, Precision};
use super::pool::{self, Team};
use super::{add_layer_norm_rows, balance, Activation, LayerNorm};

/// Writes the embedded (and normalised) rows of sequence `i` of a batch into `rows`.
pub type EmbedRows<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;
/// Turns the final states of consecutive sequences (and their lengths) into one vector each.
pub type PoolStates<'a> = dyn Fn(&[f32], &[usize]) -> Vec<Vec<f32>> + Sync + 'a;

/// A dense layer: a packed weight and an optional bias.
pub struct Linear {
    pub weight: Packed,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `weight`: [outputs, inputs] row-major, as PyTorch stores it.
    pub fn new(
        weight: &[f32],
        bias: Option<Vec<f32>>,
        inputs: usize,
        outputs: usize,
        precision: Precision,
    ) -> Linear {
        if let Some(bias) = &bias {
            assert_eq!(bias.len(), outputs, "bias shape");
        }
        Linear {
            weight: Packed::new(weight, inputs, outputs, precision),
            bias,
        }
    }

    /// `input · Wᵀ + b` for `rows` rows, on the calling thread: for small heads on top of the layers (a
    /// cross-encoder's pooler and classifier), not for the layers themselves.
    pub fn forward(&self, input: &[f32], rows: usize) -> Vec<f32> {
        let (inputs, outputs) = (self.weight.inputs(), self.weight.outputs());
        let mut out = vec![0f32; rows * outputs];
        let mut scratch = gemm::Scratch::default();
        let a = self
            .weight
            .prepare(input, rows, inputs, 0..inputs, &mut scratch);
        self.weight
            .product(&a, 0..outputs, &mut out, outputs, 0, self.epilogue());
        out
    }

    fn epilogue(&self) -> Epilogue<'_> {
        match &self.bias {
            Some(bias) => Epilogue::Bias(bias),
            None => Epilogue::Scale(1.0),
        }
    }
}

/// The MLP's input projection and activation.
pub enum Mlp {
    /// BERT: `act(x·W₁ᵀ + b₁)`, GELU in the form the config names.
    Activation(Linear, Activation),
    /// NomicBERT: `fc11(x) · SiLU(fc12(x))`, packed by [`Packed::swiglu`], no bias.
    SwiGlu(Packed),
}

impl Mlp {
    fn weight(&self) -> &Packed {
        match self {
            Mlp::Activation(linear, _) => &linear.weight,
            Mlp::SwiGlu(packed) => packed,
        }
    }
}

/// One post-norm layer: `x = LN(x + Attention(x)); x = LN(x + MLP(x))`.
pub struct Layer {
    /// The query, key and value projections fused: outputs `[q | k | v]`, each `hidden` wide, heads side
    /// by side.
    pub qkv: Linear,
    pub attention_out: Linear,
    pub attention_norm: LayerNorm,
    pub mlp: Mlp,
    pub mlp_out: Linear,
    pub mlp_norm: LayerNorm,
}

/// Most tokens run through the layers at once: bounds the buffers of a large batch of long inputs.
const TOKENS_PER_PASS: usize = 16_384;
/// A batch is dealt out in groups (no barriers) only if each member gets at least this many tokens; below
/// it, splitting every layer streams less weight per member and wins.
const GROUP_MIN_TOKENS: usize = 256;
/// Buffers bigger than this (a batch of many thousand tokens) are freed after the batch, not kept.
const KEEP_SCRATCH_BYTES: usize = 64 << 20;

/// The layers of one model, and the buffers its batches reuse.
pub struct Stack {
    pub hidden: usize,
    pub heads: usize,
    /// The MLP's intermediate width.
    pub inner: usize,
    pub layers: Vec<Layer>,
    /// Rotary position embedding of queries and keys (NomicBERT); `None` for absolute positions.
    pub rotary: Option<Rotary>,
    /// The precision the model was loaded in (each layer's is [`Precision::of`] it).
    precision: Precision,
    scratch: Mutex<Vec<Scratch>>,
}

/// A member's buffers.
#[derive(Default)]
struct Scratch {
    /// [tokens, hidden]: the member's copy of the hidden states.
    states: Vec<f32>,
    /// [tokens, 3 × its heads' width]
    qkv: Vec<f32>,
    /// [tokens, its heads' width]
    context: Vec<f32>,
    /// [tokens, its intermediate columns]
    inner: Vec<f32>,
    /// [tokens, hidden] each: its partial sums of the two output projections, read by every member.
    partial_attention: Vec<f32>,
    partial_mlp: Vec<f32>,
    prepared: gemm::Scratch,
    attention: attention::Scratch,
}

impl Scratch {
    fn floats(&self) -> usize {
        self.states.capacity()
            + self.qkv.capacity()
            + self.context.capacity()
            + self.inner.capacity()
            + self.partial_attention.capacity()
            + self.partial_mlp.capacity()
    }
}

fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

/// A pointer to a member's buffer that other members read after a barrier.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the pointers are used inside one `Pool::run`, under the barrier protocol of `Stack::layer`: a
// buffer is written by its owner only between two barriers at which no other member reads it.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// How one member sees the batch.
struct Share<'a> {
    team: &'a Team<'a>,
    /// The member's heads and intermediate columns.
    heads: std::ops::Range<usize>,
    inner: std::ops::Range<usize>,
    /// Every member's partial sums (the member's own at `team.index()`).
    partials: &'a [(Shared, Shared)],
}

/// The batch a member runs: its sequences' lengths, and where each starts in the pass.
struct Work<'a> {
    lengths: &'a [usize],
    /// Indices of the pass's sequences this work covers.
    sequences: &'a [usize],
}

impl Stack {
    pub fn new(
        hidden: usize,
        heads: usize,
        inner: usize,
        layers: Vec<Layer>,
        rotary: Option<Rotary>,
        precision: Precision,
    ) -> Stack {
        assert!(
            heads > 0 && hidden.is_multiple_of(heads),
            "heads must divide hidden"
        );
        Stack {
            hidden,
            heads,
            inner,
            layers,
            rotary,
            precision,
            scratch: Mutex::new(Vec::new()),
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The precision the model was loaded in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Relative cost of one sequence: the dense layers grow with its length, attention with its square.
    fn cost(&self, len: usize) -> f64 {
        let dense = self.hidden * (4 * self.hidden + 2 * self.inner);
        (len * dense + 2 * len * len * self.hidden) as f64
    }

    /// Runs sequences of the given lengths through the layers. `embed(i, rows)` writes the embedded (and
    /// normalised) rows of sequence `i`; `pool(states, lengths)` turns the final states of consecutive
    /// sequences into one vector each. Returns the vectors in the order of `lengths`.
    pub fn run(
        &self,
        lengths: &[usize],
        embed: &EmbedRows<'_>,
        pool: &PoolStates<'_>,
    ) -> Vec<Vec<f32>> {
        let mut results = vec![Vec::new(); lengths.len()];
        let mut start = 0;
        while start < lengths.len() {
            // A pass takes sequences while they fit the token budget, and always at least one.
            let mut end = start + 1;
            let mut tokens = lengths[start];
            while end < lengths.len() && tokens + lengths[end] <= TOKENS_PER_PASS {
                tokens += lengths[end];
                end += 1;
            }
            let pass: Vec<usize> = (start..end).collect();
            for (i, vector) in self.pass(lengths, &pass, embed, pool) {
                results[i] = vector;
            }
            start = end;
        }
        results
    }

    /// One pass of sequences (indices into `lengths`): picks how the team shares it, runs it, returns
    /// (index, vector) pairs.
    fn pass(
        &self,
        lengths: &[usize],
        pass: &[usize],
        embed: &EmbedRows<'_>,
        pool: &PoolStates<'_>,
    ) -> Vec<(usize, Vec<f32>)> {
        let threads = pool::global().threads();
        let tokens: usize = pass.iter().map(|&i| lengths[i]).sum();
        let costs: Vec<f64> = pass.iter().map(|&i| self.cost(lengths[i])).collect();
        let total: f64 = costs.iter().sum();
        let groups = balance(&costs, threads);
        let heaviest = groups
            .iter()
            .map(|g| g.iter().map(|&i| costs[i]).sum::<f64>())
            .fold(0f64, f64::max);
        let grouped = threads > 1
            && groups.len() == threads
            && tokens >= GROUP_MIN_TOKENS * threads
            && heaviest <= total * 1.15 / threads as f64;
        let groups: Vec<Vec<usize>> = if grouped {
            groups
                .into_iter()
                .map(|g| g.into_iter().map(|i| pass[i]).collect())
                .collect()
        } else {
            vec![pass.to_vec()]
        };
        let members = if grouped { groups.len() } else { threads };
        let mut scratches = self.take_scratch(members);
        let pointers: Vec<ScratchPtr> = scratches.iter_mut().map(|s| ScratchPtr(s)).collect();
        let published: Vec<[AtomicPtr<f32>; 2]> =
            (0..members).map(|_| Default::default()).collect();
        let results = Mutex::new(Vec::with_capacity(pass.len()));
        pool::global().run(members, |team| {
            // SAFETY: each member takes the scratch of its own index, and no two members share an index.
            let own = pointers[team.index()].0;
            let own = unsafe { &mut *own };
            if grouped {
                // A team smaller than asked for (the pool busy with another model's batch) takes the
                // groups in turn: member i runs groups i, i + size, ….
                for group in groups.iter().skip(team.index()).step_by(team.size()) {
                    let solo = Team::solo();
                    let work = Work {
                        lengths,
                        sequences: group,
                    };
                    let published = &published[team.index()..=team.index()];
                    let pooled = self.forward(&solo, work, own, published, embed, pool);
                    lock(&results).extend(group.iter().copied().zip(pooled));
                }
            } else {
                let work = Work {
                    lengths,
                    sequences: &groups[0],
                };
                let pooled = self.forward(team, work, own, &published, embed, pool);
                if team.index() == 0 {
                    lock(&results).extend(groups[0].iter().copied().zip(pooled));
                }
            }
        });
        self.give_back(scratches);
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        assert_eq!(
            results.len(),
            pass.len(),
            "a sequence of the batch went unrun"
        );
        results
    }

    fn take_scratch(&self, members: usize) -> Vec<Scratch> {
        let mut kept = lock(&self.scratch);
        (0..members)
            .map(|_| kept.pop().unwrap_or_default())
            .collect()
    }

    fn give_back(&self, scratches: Vec<Scratch>) {
        let mut kept = lock(&self.scratch);
        for scratch in scratches {
            if scratch.floats() * 4 <= KEEP_SCRATCH_BYTES {
                kept.push(scratch);
            }
        }
    }

    /// One member's forward pass over `work`; `team` says which share is the member's (a team of one
    /// takes everything). Returns the pooled vectors on member 0 (empty on the others).
    fn forward(
        &self,
        team: &Team,
        work: Work,
        own: &mut Scratch,
        published: &[[AtomicPtr<f32>; 2]],
        embed: &EmbedRows<'_>,
        pool: &PoolStates<'_>,
    ) -> Vec<Vec<f32>> {
        let (hidden, d) = (self.hidden, self.head_dim());
        let lengths: Vec<usize> = work.sequences.iter().map(|&i| work.lengths[i]).collect();
        let tokens: usize = lengths.iter().sum();
        // Shares: whole heads such that each member's inputs of the attention output start where that
        // weight's precision may split them, and intermediate columns in pairs of strips.
        let align = self
            .layers
            .first()
            .map_or(1, |l| l.attention_out.weight.input_granule());
        let head_granule = (1..=self.heads)
            .find(|g| (g * d).is_multiple_of(align))
            .unwrap_or(self.heads);
        let heads = team.share(self.heads, head_granule);
        let inner = team.share(self.inner, 2 * gemm::LANES);
        let width = heads.len() * d;

        grow(&mut own.states, tokens * hidden);
        grow(&mut own.qkv, tokens * 3 * width);
        grow(&mut own.context, tokens * width);
        grow(&mut own.inner, tokens * inner.len());
        grow(&mut own.partial_attention, tokens * hidden);
        grow(&mut own.partial_mlp, tokens * hidden);
        // Every member publishes where its partial sums lie, then reads where the others' lie.
        published[team.index()][0].store(own.partial_attention.as_mut_ptr(), SeqCst);
        published[team.index()][1].store(own.partial_mlp.as_mut_ptr(), SeqCst);
        team.barrier();
        let partials: Vec<(Shared, Shared)> = published[..team.size()]
            .iter()
            .map(|p| (Shared(p[0].load(SeqCst)), Shared(p[1].load(SeqCst))))
            .collect();
        let share = Share {
            team,
            heads,
            inner,
            partials: &partials,
        };

        let mut offset = 0;
        for (&i, &len) in work.sequences.iter().zip(&lengths) {
            embed(i, &mut own.states[offset * hidden..(offset + len) * hidden]);
            offset += len;
        }
        for layer in &self.layers {
            self.layer(layer, &share, &lengths, tokens, own);
        }
        if team.index() == 0 {
            pool(&own.states[..tokens * hidden], &lengths)
        } else {
            Vec::new()
        }
    }

    /// One layer for one member (see the module documentation for the two barriers).
    fn layer(
        &self,
        layer: &Layer,
        share: &Share,
        lengths: &[usize],
        tokens: usize,
        s: &mut Scratch,
    ) {
        let (hidden, d) = (self.hidden, self.head_dim());
        let width = share.heads.len() * d;
        let states = &mut s.states[..tokens * hidden];

        // Queries, keys and values of the member's heads, then their attention.
        let prepared = layer
            .qkv
            .weight
            .prepare(states, tokens, hidden, 0..hidden, &mut s.prepared);
        let cols = share.heads.start * d..share.heads.end * d;
        for part in 0..3 {
            let cols = part * hidden + cols.start..part * hidden + cols.end;
            layer.qkv.weight.product(
                &prepared,
                cols,
                &mut s.qkv,
                3 * width,
                part * width,
                layer.qkv.epilogue(),
            );
        }
        let layout = Heads {
            stride: 3 * width,
            q: 0,
            k: width,
            v: 2 * width,
            head_dim: d,
        };
        let mut offset = 0;
        for &len in lengths {
            let qkv = &mut s.qkv[offset * 3 * width..(offset + len) * 3 * width];
            if let Some(rotary) = &self.rotary {
                rotary.apply(qkv, len, 3 * width, 0, share.heads.len());
                rotary.apply(qkv, len, 3 * width, width, share.heads.len());
            }
            attention::attend(
                qkv,
                len,
                layout,
                share.heads.len(),
                &mut s.context[offset * width..(offset + len) * width],
                width,
                &mut s.attention,
            );
            offset += len;
        }

        // The attention output projection over the member's heads' inputs, then the sum and the norm.
        project_sum_norm(
            share,
            |p| p.0,
            &layer.attention_out,
            &layer.attention_norm,
            &s.context,
            width,
            cols,
            &mut s.prepared,
            &mut s.states[..tokens * hidden],
            tokens,
        );

        // The member's intermediate columns, the output projection over them, the sum and the norm.
        let states = &s.states[..tokens * hidden];
        let mlp = layer.mlp.weight();
        let prepared = mlp.prepare(states, tokens, hidden, 0..hidden, &mut s.prepared);
        let inner_width = share.inner.len();
        let epilogue = match &layer.mlp {
            Mlp::Activation(linear, activation) => match &linear.bias {
                Some(bias) => Epilogue::BiasActivation(bias, *activation),
                None => panic!("an activation MLP without bias"),
            },
            Mlp::SwiGlu(_) => Epilogue::SwiGlu,
        };
        mlp.product(
            &prepared,
            share.inner.clone(),
            &mut s.inner,
            inner_width,
            0,
            epilogue,
        );
        project_sum_norm(
            share,
            |p| p.1,
            &layer.mlp_out,
            &layer.mlp_norm,
            &s.inner,
            inner_width,
            share.inner.clone(),
            &mut s.prepared,
            &mut s.states[..tokens * hidden],
            tokens,
        );
    }
}

/// One member's part of `linear` over its columns `k` of the input (`input`, `width` wide), into its own
/// partial buffer (`slot` of its pair); after the barrier, every member alike sets
/// `states = LN(states + Σ partials + bias)`. The attention and MLP output steps both end this way, each
/// with its own partials so that one step's writes never meet the previous step's reads.
#[allow(clippy::too_many_arguments)]
fn project_sum_norm(
    share: &Share,
    slot: fn(&(Shared, Shared)) -> Shared,
    linear: &Linear,
    norm: &LayerNorm,
    input: &[f32],
    width: usize,
    k: std::ops::Range<usize>,
    scratch: &mut gemm::Scratch,
    states: &mut [f32],
    tokens: usize,
) {
    let hidden = states.len() / tokens.max(1);
    let prepared = linear.weight.prepare(input, tokens, width, k, scratch);
    {
        // SAFETY: the member's own partial buffer in `slot` (at least tokens × hidden); no other member
        // reads it until the barrier below, and all finished reading its previous contents before the
        // barrier that ended the step before this one.
        let partial = unsafe {
            std::slice::from_raw_parts_mut(
                slot(&share.partials[share.team.index()]).0,
                states.len(),
            )
        };
        linear.weight.product(
            &prepared,
            0..hidden,
            partial,
            hidden,
            0,
            Epilogue::Scale(1.0),
        );
    }
    share.team.barrier();
    reduce_norm(
        states,
        share.partials.iter().map(slot),
        linear.bias.as_deref(),
        norm,
        tokens,
    );
}

/// `states = LN(states + Σ partials + bias)`, row by row, every member alike.
fn reduce_norm(
    states: &mut [f32],
    partials: impl Iterator<Item = Shared>,
    bias: Option<&[f32]>,
    norm: &LayerNorm,
    tokens: usize,
) {
    let len = states.len();
    let partials: Vec<&[f32]> = partials
        // SAFETY: every member wrote its partial (tokens × hidden) before the barrier just passed, and
        // none writes it again before the next barrier.
        .map(|p| unsafe { std::slice::from_raw_parts(p.0.cast_const(), len) })
        .collect();
    debug_assert_eq!(len % tokens.max(1), 0);
    add_layer_norm_rows(states, &partials, bias, norm);
}

#[derive(Clone, Copy)]
struct ScratchPtr(*mut Scratch);
// SAFETY: each member dereferences only the scratch of its own index.
unsafe impl Send for ScratchPtr {}
unsafe impl Sync for ScratchPtr {}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
