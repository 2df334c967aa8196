//! The op cases: every op of the backend once, as data (shape keys and sizes, an input generator,
//! tolerances, bytes and FLOPs) and one call of the op that runs on any [`Backend`]. Three users
//! iterate this table:
//!
//! - the unit tests (`gpu/tests/cases.rs`): each case at its `tests` sizes (small and odd, so that
//!   swapped dimensions show) on the virtual GPU, in f32 and bf16;
//! - `fastpt doctor` (`gpu/check.rs`): each case at its `doctor` sizes, on any device;
//! - the kernel lab (`examples/kernel_lab.rs`): each case that has lab shapes (`lab_vgpu` on the
//!   virtual GPU, `lab_cuda` on a real one), checked and then timed, its rates from `cost`.
//!
//! One check ([`check_case`]): the case's generator makes the host data: random inputs rounded
//! to the dtype (so both backends start from the same numbers) and the start values of the
//! outputs the op adds to (`+=`). Inputs a backward takes from its forward (saved statistics) are
//! the outputs of the forward's case, run on the CPU first ([`derive`]). The CPU reference
//! (`CpuBackend<f32>`) runs the op; then the device does, with the outputs it writes (`=`)
//! poisoned with NaN, so that an element the op skips stays NaN. Each output's error is
//! ‖dev − cpu‖ / ‖cpu‖ against the case's tolerance: [`op_tolerance`] unless the case says
//! otherwise.
//!
//! Adding an op costs one [`Case`] in [`cases`], and its name in the unit tests' list (a test
//! there checks the list against this table).

use std::fmt;
use std::ops::Index;

use half::bf16;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::device::DType;
use crate::backend::cpu::CpuBackend;
use crate::backend::nf4::{quantize_nf4, Nf4Tensor};
use crate::backend::{
    Activation, AdamW, AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims,
    FusionAttentionDims, FusionMode, GatedExpertsDims, Gemm, LampPoolDims, LayerNormDims,
    LinearDims, RelBias, RmsNormDims, RopeDims,
};
use crate::testing::random_vec;

/// The tolerance of one op's outputs unless its case says otherwise: f32 1e-5, bf16 2e-2.
pub fn op_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::Bf16 => 2e-2,
    }
}

/// `x` rounded to what `dtype` can hold.
pub fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

// ---- shapes -------------------------------------------------------------------------------------

/// Named shapes: the values in the order of the case's keys.
pub type Shapes = &'static [(&'static str, &'static [usize])];

/// One shape of a case: a value for each of its keys (flags are 0 or 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The name of the shape in the table ("" when it has none).
    pub name: String,
    pub keys: &'static [&'static str],
    pub vals: Vec<usize>, // (keys.len())
}

impl Shape {
    pub fn new(name: &str, keys: &'static [&'static str], vals: &[usize]) -> Self {
        assert_eq!(keys.len(), vals.len(), "shape {name:?}: keys {keys:?}");
        Shape {
            name: name.to_string(),
            keys,
            vals: vals.to_vec(),
        }
    }

    /// Whether flag `key` is set.
    pub fn flag(&self, key: &str) -> bool {
        self[key] != 0
    }
}

impl Index<&str> for Shape {
    type Output = usize;

    /// The value of `key` (a key the case does not have is a bug in the table).
    fn index(&self, key: &str) -> &usize {
        match self.keys.iter().position(|k| *k == key) {
            Some(i) => &self.vals[i],
            None => panic!("shape {self} has no key {key}"),
        }
    }
}

/// `key=value ...`
impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kv: Vec<String> = self
            .keys
            .iter()
            .zip(&self.vals)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(f, "{}", kv.join(" "))
    }
}

// ---- host data ----------------------------------------------------------------------------------

/// What a float array of a case is to the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read.
    In,
    /// Read; the output of the same name of the case named in [`Case::derive_from`].
    Derived,
    /// Written (`=`): NaN on the device before the launch, compared.
    Out,
    /// Added to (`+=`): random start values, compared.
    Acc,
}

/// One float array of a case.
#[derive(Debug, Clone)]
pub struct Array {
    pub name: String,
    pub role: Role,
    pub len: usize,
    /// The values (In, Acc: start values; Derived once derived; Out: empty).
    pub data: Vec<f32>, // (len)
    /// Compared with the reference rounded to the dtype: the op stores a value it keeps in f32
    /// elsewhere (AdamW's parameter is its f32 master copy rounded).
    pub round_reference: bool,
}

/// The host data of one case at one shape, made by the case's generator (see the module docs).
/// The op sees the arrays in the order the generator declares them: `In` and `Derived` ones in
/// [`Bufs::ins`], `Out` and `Acc` ones in [`Bufs::outs`].
#[derive(Debug, Clone)]
pub struct Host {
    pub dtype: DType,
    pub arrays: Vec<Array>,
    /// Index inputs (ids, rows, masks, positions), in declaration order.
    pub index: Vec<(String, Vec<i32>)>,
    /// Optimiser state: read, updated and compared.
    pub states: Vec<(String, Vec<f32>)>,
    pub nf4: Option<Nf4Tensor>,
    /// The name of the scalar the op returns, when it returns one (compared).
    pub scalar: Option<String>,
    seed: u64,
}

impl Host {
    /// The data of `case` at `shape` (derived arrays still empty: [`derive`]).
    pub fn generate<B: Backend>(case: &Case<B>, shape: &Shape, dtype: DType, seed: u64) -> Host {
        let mut host = Host {
            dtype,
            arrays: Vec::new(),
            index: Vec::new(),
            states: Vec::new(),
            nf4: None,
            scalar: None,
            seed,
        };
        (case.inputs)(shape, &mut host);
        host
    }

    /// Fresh random values in (-scale, scale), rounded to the dtype (not stored).
    pub fn random(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.seed += 1;
        random_vec(n, scale, self.seed)
            .into_iter()
            .map(|x| round_to(x as f32, self.dtype))
            .collect()
    }

    /// `n` random indices in `0..r`.
    pub fn ids(&mut self, n: usize, r: usize) -> Vec<i32> {
        self.seed += 1;
        random_vec(n, 1.0, self.seed)
            .into_iter()
            .map(|x| (((x + 1.0) / 2.0 * r as f64) as usize).min(r.saturating_sub(1)) as i32)
            .collect()
    }

    /// `n ≤ r` distinct indices in `0..r`, not in order.
    pub fn distinct_ids(&mut self, n: usize, r: usize) -> Vec<i32> {
        self.seed += 1;
        let mut all: Vec<i32> = (0..r as i32).collect();
        all.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed));
        all.truncate(n);
        all
    }

    fn push(&mut self, name: &str, role: Role, len: usize, data: Vec<f32>) {
        self.arrays.push(Array {
            name: name.to_string(),
            role,
            len,
            data,
            round_reference: false,
        });
    }

    /// An input holding `data` rounded to the dtype.
    pub fn input(&mut self, name: &str, data: Vec<f32>) {
        let dt = self.dtype;
        let data: Vec<f32> = data.into_iter().map(|x| round_to(x, dt)).collect();
        self.push(name, Role::In, data.len(), data);
    }

    /// A random input in (-scale, scale).
    pub fn rand(&mut self, name: &str, n: usize, scale: f64) {
        let data = self.random(n, scale);
        self.push(name, Role::In, n, data);
    }

    /// An input that is an output of the case the case derives from (same name).
    pub fn derived(&mut self, name: &str) {
        self.push(name, Role::Derived, 0, Vec::new());
    }

    /// An output the op writes (`=`).
    pub fn out(&mut self, name: &str, n: usize) {
        self.push(name, Role::Out, n, Vec::new());
    }

    /// An output the op writes, compared with the reference rounded to the dtype.
    pub fn out_rounded(&mut self, name: &str, n: usize) {
        self.out(name, n);
        if let Some(a) = self.arrays.last_mut() {
            a.round_reference = true;
        }
    }

    /// An output the op adds to (`+=`), starting from random values in (-scale, scale).
    pub fn acc(&mut self, name: &str, n: usize, scale: f64) {
        let data = self.random(n, scale);
        self.push(name, Role::Acc, n, data);
    }

    pub fn index(&mut self, name: &str, ids: Vec<i32>) {
        self.index.push((name.to_string(), ids));
    }

    pub fn state(&mut self, name: &str, data: Vec<f32>) {
        self.states.push((name.to_string(), data));
    }

    pub fn nf4(&mut self, q: Nf4Tensor) {
        self.nf4 = Some(q);
    }

    /// The op returns a scalar (compared).
    pub fn scalar(&mut self, name: &str) {
        self.scalar = Some(name.to_string());
    }

    /// The compared outputs in the order of [`Bufs::outputs`], each with `round_reference`.
    fn compared(&self) -> Vec<(&str, bool)> {
        let arrays = self
            .arrays
            .iter()
            .filter(|a| matches!(a.role, Role::Out | Role::Acc))
            .map(|a| (a.name.as_str(), a.round_reference));
        let states = self.states.iter().map(|(n, _)| (n.as_str(), false));
        let scalar = self.scalar.iter().map(|n| (n.as_str(), false));
        arrays.chain(states).chain(scalar).collect()
    }
}

// ---- buffers on a backend -------------------------------------------------------------------------

/// The buffers of one case on a backend, in the order the generator declared them.
pub struct Bufs<B: Backend> {
    /// The `In` and `Derived` arrays.
    pub ins: Vec<B::Tensor>,
    /// The `Out` and `Acc` arrays.
    pub outs: Vec<B::Tensor>,
    pub index: Vec<B::Index>,
    pub states: Vec<B::State>,
    pub nf4: Option<B::Nf4>,
    /// What the op returned, for an op that returns a scalar.
    pub scalar: f64,
}

impl<B: Backend> Bufs<B> {
    /// Uploads `host`; the `Out` arrays are NaN when `poison`, else zeros.
    pub fn upload(be: &B, host: &Host, poison: bool) -> Self {
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for a in &host.arrays {
            match a.role {
                Role::In | Role::Derived => {
                    assert_eq!(a.data.len(), a.len, "{}: not derived yet", a.name);
                    ins.push(be.upload_f32(a.data.clone()));
                }
                Role::Acc => outs.push(be.upload_f32(a.data.clone())),
                Role::Out => {
                    let fill = if poison { f32::NAN } else { 0.0 };
                    outs.push(be.upload_f32(vec![fill; a.len]));
                }
            }
        }
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Bufs {
            ins,
            outs,
            index: host.index.iter().map(|(_, i)| be.upload_index(i)).collect(),
            states: host
                .states
                .iter()
                .map(|(_, s)| be.state_upload(&f64s(s)))
                .collect(),
            nf4: host.nf4.clone().map(|q| be.upload_nf4(q)),
            scalar: f64::NAN,
        }
    }

    /// The compared outputs: the `Out` and `Acc` arrays, the states, the scalar.
    pub fn outputs(&self, be: &B, host: &Host) -> Outputs {
        let names = host.compared();
        let arrays = self
            .outs
            .iter()
            .map(|x| be.download_f32(x).into_iter().map(f64::from).collect());
        let states = self.states.iter().map(|s| be.state_download(s));
        let scalar = host.scalar.iter().map(|_| vec![self.scalar]);
        let values: Vec<Vec<f64>> = arrays.chain(states).chain(scalar).collect();
        assert_eq!(names.len(), values.len(), "the outputs of the host data");
        names
            .into_iter()
            .map(|(n, _)| n.to_string())
            .zip(values)
            .collect()
    }
}

/// Named output values.
pub type Outputs = Vec<(String, Vec<f64>)>;

// ---- the case ---------------------------------------------------------------------------------------

/// One call of the op on a backend: the buffers and the shape.
pub type Run<B> = fn(&B, &mut Bufs<B>, &Shape);

/// Bytes an op must move at least (each input read once, each output written once) and its
/// FLOPs where it is GEMM-like: the kernel lab's rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub bytes: f64,
    pub flops: Option<f64>,
}

/// One op of the table (see the module docs).
pub struct Case<B: Backend> {
    /// The `Backend` method (and kernel family) the case calls.
    pub op: &'static str,
    /// The names of the values of a shape (dimensions; flags 0 / 1).
    pub keys: &'static [&'static str],
    /// The unit tests' shapes: small and odd.
    pub tests: Shapes,
    /// `fastpt doctor`'s shapes (named: the name goes into the row).
    pub doctor: Shapes,
    /// The kernel lab's default shapes on the virtual GPU and on a real one (none: not in the lab).
    pub lab_vgpu: Shapes,
    pub lab_cuda: Shapes,
    /// Makes the host data of a shape.
    pub inputs: fn(&Shape, &mut Host),
    /// The one call of the op.
    pub run: Run<B>,
    /// The case whose outputs the `Derived` arrays are (a backward's forward).
    pub derive_from: Option<&'static str>,
    /// Derived arrays reach the reference unrounded (the device rounds them as it stores them):
    /// attention's saved lse, which rounded to bf16 would scale each reference row by e^δ.
    pub exact_reference: bool,
    /// The tolerance of an output (by name) in a dtype.
    pub tol: fn(DType, &str) -> f64,
    /// On a GPU, run with each attention kernel (`GpuBackend::with_attention`).
    pub attention_kernels: bool,
    /// What a shape must satisfy (checked on the kernel lab's `--shape`).
    pub needs: fn(&Shape) -> Result<(), String>,
    /// Bytes and FLOPs at a shape, given the element size.
    pub cost: fn(&Shape, usize) -> Cost,
}

impl<B: Backend> Case<B> {
    fn new(
        op: &'static str,
        keys: &'static [&'static str],
        inputs: fn(&Shape, &mut Host),
        run: Run<B>,
    ) -> Self {
        Case {
            op,
            keys,
            tests: &[],
            doctor: &[],
            lab_vgpu: &[],
            lab_cuda: &[],
            inputs,
            run,
            derive_from: None,
            exact_reference: false,
            tol: |dtype, _| op_tolerance(dtype),
            attention_kernels: false,
            needs: |_| Ok(()),
            cost: |_, _| Cost::default(),
        }
    }

    fn tests(self, tests: Shapes) -> Self {
        Case { tests, ..self }
    }

    fn doctor(self, doctor: Shapes) -> Self {
        Case { doctor, ..self }
    }

    fn lab(self, lab_vgpu: Shapes, lab_cuda: Shapes) -> Self {
        Case {
            lab_vgpu,
            lab_cuda,
            ..self
        }
    }

    fn derive(self, from: &'static str, exact_reference: bool) -> Self {
        Case {
            derive_from: Some(from),
            exact_reference,
            ..self
        }
    }

    fn tol(self, tol: fn(DType, &str) -> f64) -> Self {
        Case { tol, ..self }
    }

    fn attention_kernels(self) -> Self {
        Case {
            attention_kernels: true,
            ..self
        }
    }

    fn needs(self, needs: fn(&Shape) -> Result<(), String>) -> Self {
        Case { needs, ..self }
    }

    fn cost(self, cost: fn(&Shape, usize) -> Cost) -> Self {
        Case { cost, ..self }
    }

    /// The shapes of `list` (one of the case's shape lists).
    pub fn shapes(&self, list: Shapes) -> Vec<Shape> {
        list.iter()
            .map(|(name, vals)| Shape::new(name, self.keys, vals))
            .collect()
    }
}

/// The case of op `op`.
pub fn find<'a, B: Backend>(table: &'a [Case<B>], op: &str) -> Option<&'a Case<B>> {
    table.iter().find(|c| c.op == op)
}

// ---- running and comparing ------------------------------------------------------------------------

/// Fills the `Derived` arrays of `host` with the outputs of the case they come from, run on `be`
/// from the same inputs (by name; the rest from that case's own generator). Rounded to the dtype
/// unless the case keeps them exact for the reference.
pub fn derive<B: Backend>(
    be: &B,
    table: &[Case<B>],
    case: &Case<B>,
    shape: &Shape,
    host: &mut Host,
) {
    let Some(from) = case.derive_from else {
        return;
    };
    let from = find(table, from).unwrap_or_else(|| panic!("{}: no case {from}", case.op));
    let mut first = Host::generate(from, shape, host.dtype, host.seed ^ 0x5eed);
    for a in first.arrays.iter_mut().filter(|a| a.role == Role::In) {
        if let Some(mine) = host.arrays.iter().find(|m| m.name == a.name) {
            a.data.clone_from(&mine.data);
        }
    }
    for (name, ids) in &mut first.index {
        if let Some((_, mine)) = host.index.iter().find(|(m, _)| m == name) {
            ids.clone_from(mine);
        }
    }
    let outputs = run_case(be, from, &first, shape, false);
    let dt = host.dtype;
    for a in host.arrays.iter_mut().filter(|a| a.role == Role::Derived) {
        let (_, values) = outputs
            .iter()
            .find(|(n, _)| *n == a.name)
            .unwrap_or_else(|| panic!("{}: {} has no output {}", case.op, from.op, a.name));
        a.data = values
            .iter()
            .map(|&x| {
                if case.exact_reference {
                    x as f32
                } else {
                    round_to(x as f32, dt)
                }
            })
            .collect();
        a.len = a.data.len();
    }
}

/// Uploads `host` to `be` (the `Out` arrays NaN when `poison`), runs the op once and returns the
/// compared outputs.
pub fn run_case<B: Backend>(
    be: &B,
    case: &Case<B>,
    host: &Host,
    shape: &Shape,
    poison: bool,
) -> Outputs {
    let mut bufs = Bufs::upload(be, host, poison);
    (case.run)(be, &mut bufs, shape);
    bufs.outputs(be, host)
}

/// The CPU reference of op `op`: derives `host`'s derived arrays on the CPU, then runs the op.
pub fn reference(op: &str, host: &mut Host, shape: &Shape) -> Outputs {
    let cpu = CpuBackend::<f32>::new();
    let table = cases::<CpuBackend<f32>>();
    let case = find(&table, op).unwrap_or_else(|| panic!("no case {op}"));
    derive(&cpu, &table, case, shape, host);
    let mut outputs = run_case(&cpu, case, host, shape, false);
    for ((_, values), (_, round)) in outputs.iter_mut().zip(host.compared()) {
        if round {
            for x in values.iter_mut() {
                *x = round_to(*x as f32, host.dtype) as f64;
            }
        }
    }
    outputs
}

/// `‖got − want‖ / ‖want‖` (plain `‖got‖` when `want` is zero). Where `want` is infinite (the
/// lse of a row that sees no key) `got` must equal it and the element is left out; NaN when
/// `got` is not finite elsewhere (an element the op did not write).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    let (mut diff, mut norm) = (0.0, 0.0);
    for (&g, &w) in got.iter().zip(want) {
        if !w.is_finite() || !g.is_finite() {
            if g != w {
                return f64::NAN;
            }
            continue;
        }
        diff += (g - w) * (g - w);
        norm += w * w;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The error of one output of a case.
#[derive(Debug, Clone)]
pub struct OutputErr {
    pub output: String,
    /// [`rel_err`] (NaN: a non-finite value where the reference has a finite one).
    pub rel_err: f64,
    pub tol: f64,
}

impl OutputErr {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// The error of each output of `got` against `want`, with the case's tolerances.
pub fn errors<B: Backend>(
    case: &Case<B>,
    dtype: DType,
    got: &Outputs,
    want: &Outputs,
) -> Vec<OutputErr> {
    got.iter()
        .zip(want)
        .map(|((name, g), (_, w))| OutputErr {
            output: name.clone(),
            rel_err: rel_err(g, w),
            tol: (case.tol)(dtype, name),
        })
        .collect()
}

/// `case` at `shape` on `be` (storing `dtype`) against the CPU reference, from fresh inputs of
/// `seed`: the error of each output.
pub fn check_case<B: Backend>(
    be: &B,
    dtype: DType,
    case: &Case<B>,
    shape: &Shape,
    seed: u64,
) -> Vec<OutputErr> {
    let mut host = Host::generate(case, shape, dtype, seed);
    let want = reference(case.op, &mut host, shape);
    let got = run_case(be, case, &host, shape, true);
    errors(case, dtype, &got, &want)
}

// ---- helpers of the cases --------------------------------------------------------------------------

/// A buffer list that does not match the case's generator: a bug in the table.
macro_rules! bad {
    () => {
        unreachable!("the buffers do not match the case's generator")
    };
}

fn ok_if(cond: bool, msg: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg.to_string())
    }
}

fn activation(sh: &Shape) -> Activation {
    match sh["act"] {
        0 => Activation::Relu,
        1 => Activation::GeluTanh,
        _ => Activation::Silu,
    }
}

/// ReLU's input with a 0 (ReLU' at 0 is 0), scale 4: every branch of the activations.
fn act_input(sh: &Shape, g: &mut Host) {
    let mut a = g.random(sh["len"], 4.0);
    if let Some(a0) = a.first_mut() {
        *a0 = 0.0;
    }
    g.input("a", a);
}

/// The matmul variant of a shape: the transposes, and a different alpha for each.
fn gemm(sh: &Shape) -> Gemm {
    let (ta, tb) = (sh.flag("ta"), sh.flag("tb"));
    let alpha = match (ta, tb) {
        (false, false) => 1.0,
        (false, true) => 0.5,
        (true, false) => -1.5,
        (true, true) => 1.0,
    };
    Gemm {
        trans_a: ta,
        trans_b: tb,
        ..Gemm::nn(sh["m"], sh["n"], sh["k"])
    }
    .alpha(alpha)
    .accumulate(sh.flag("acc"))
}

/// Softmax of each row of `x (N, K)`, in f64 on the host (gate weights that sum to 1).
fn softmax_rows(x: &[f32], k: usize) -> Vec<f32> {
    x.chunks(k.max(1))
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / sum) as f32)
        })
        .collect()
}

/// cos and sin tables `(rows, D/2)` of made-up frequencies.
fn rope_tables(sh: &Shape, g: &mut Host) {
    let (rows, half) = (sh["rows"], sh["d"] / 2);
    let angle = |k: usize| {
        let (p, i) = (k / half, k % half);
        p as f64 * 0.9f64.powi(i as i32 * 3) + 0.1 * i as f64
    };
    g.input(
        "cos",
        (0..rows * half).map(|k| angle(k).cos() as f32).collect(),
    );
    g.input(
        "sin",
        (0..rows * half).map(|k| angle(k).sin() as f32).collect(),
    );
}

/// Positions in `0..rows`, unordered, the last row first and the last two equal.
fn rope_positions(sh: &Shape, g: &mut Host) {
    let (n, rows) = (sh["n"], sh["rows"]);
    let mut pos = g.ids(n, rows);
    if let Some(p) = pos.first_mut() {
        *p = rows.saturating_sub(1) as i32;
    }
    if n >= 3 {
        pos[n - 1] = pos[n - 2];
    }
    g.index("positions", pos);
}

fn rope_needs(sh: &Shape) -> Result<(), String> {
    ok_if(
        sh["d"].is_multiple_of(2) && (sh["rows"] > 0 || sh["n"] == 0),
        "rope needs an even d and rows > 0",
    )
}

const ATTN_KEYS: &[&str] = &[
    "b", "t", "s", "h", "hkv", "d", "causal", "bias", "pad", "pad0", "qoff", "scale", "buckets",
    "maxdist",
];

fn attn_dims(sh: &Shape) -> AttnDims {
    AttnDims {
        b: sh["b"],
        t: sh["t"],
        s: sh["s"],
        h: sh["h"],
        h_kv: sh["hkv"],
        d: sh["d"],
    }
}

/// `scale` is in thousandths; 0 is 1/√D.
fn attn_scale(sh: &Shape) -> f64 {
    match sh["scale"] {
        0 => 1.0 / (sh["d"] as f64).sqrt(),
        s => s as f64 / 1000.0,
    }
}

/// `(B, S)`: the last batch entry's last `pad` keys and the first entry's last `pad0` keys are
/// padding.
fn key_mask(sh: &Shape) -> Vec<i32> {
    let (b, s) = (sh["b"], sh["s"]);
    (0..b * s)
        .map(|i| {
            let (e, j) = (i / s, i % s);
            let pad = if e + 1 == b {
                sh["pad"]
            } else if e == 0 {
                sh["pad0"]
            } else {
                0
            };
            i32::from(j + pad < s)
        })
        .collect()
}

fn attn_mask<'a, I>(sh: &Shape, key_mask: &'a I) -> AttnMask<'a, I> {
    AttnMask {
        key_mask,
        causal: sh.flag("causal"),
    }
}

/// The T5 relative bias when the case has a table: bidirectional unless causal or one step
/// against a KV cache (`qoff > 0`).
fn rel_bias<'a, X>(sh: &Shape, table: Option<&'a X>) -> Option<RelBias<'a, X>> {
    table.map(|table| RelBias {
        table,
        bidirectional: !(sh.flag("causal") || sh["qoff"] > 0),
        num_buckets: sh["buckets"],
        max_distance: sh["maxdist"],
        q_offset: sh["qoff"],
    })
}

fn attn_needs(sh: &Shape) -> Result<(), String> {
    let AttnDims {
        b,
        t,
        s,
        h,
        h_kv,
        d,
    } = attn_dims(sh);
    ok_if(
        b > 0 && t > 0 && s > 0 && d > 0 && h_kv > 0 && h.is_multiple_of(h_kv),
        "attention needs b, t, s, d, hkv > 0 and hkv dividing h",
    )?;
    ok_if(
        sh["pad"] <= s && sh["pad0"] <= s,
        "attention needs pad, pad0 <= s",
    )?;
    ok_if(
        !sh.flag("bias") || (sh["buckets"] >= 4 && sh["maxdist"] >= sh["buckets"]),
        "the relative bias needs buckets >= 4 and maxdist >= buckets",
    )
}

/// q, k, v (and dout first for the backward), the bias table, the key mask.
fn attn_inputs(sh: &Shape, g: &mut Host, backward: bool) {
    let AttnDims {
        b,
        t,
        s,
        h,
        h_kv,
        d,
    } = attn_dims(sh);
    let (nq, nk) = (b * t * h * d, b * s * h_kv * d);
    if backward {
        g.rand("dout", nq, 1.0);
    }
    g.rand("q", nq, 1.5);
    g.rand("k", nk, 1.5);
    g.rand("v", nk, 1.0);
    if backward {
        g.derived("out");
        g.derived("lse");
    }
    if sh.flag("bias") {
        g.rand("table", sh["buckets"] * h, 2.0);
    }
    g.index("key_mask", key_mask(sh));
    if backward {
        g.out("dq", nq);
        g.out("dk", nk);
        g.out("dv", nk);
    } else {
        g.out("out", nq);
        g.out("lse", b * h * t);
    }
}

/// FLOPs: the forward is two GEMMs per head, scores q·kᵀ and probabilities·v, each 2·T·S·D:
/// 4·B·H·T·S·D. The backward recomputes the scores and does four more GEMMs (dv = pᵀ·dout,
/// dp = dout·vᵀ, dq = ds·k, dk = dsᵀ·q): 5 GEMMs, 2.5× the forward (FlashAttention-2's
/// convention). Causal: half of that, the work a kernel that skips masked tiles must do (a kernel
/// that does not skip shows as slower, not as more FLOPs). Bytes: q, k, v (and dout, out for the
/// backward) read once, the outputs written once, the i32 mask and the bias table read once.
fn attn_cost(sh: &Shape, el: usize, backward: bool) -> Cost {
    let AttnDims {
        b,
        t,
        s,
        h,
        h_kv,
        d,
    } = attn_dims(sh);
    let causal_frac = if sh.flag("causal") { 0.5 } else { 1.0 };
    let fwd_flops = 4.0 * (b * h * t * s * d) as f64 * causal_frac;
    let el = el as f64;
    let (nq, nk, nlse) = (
        (b * t * h * d) as f64,
        (b * s * h_kv * d) as f64,
        (b * h * t) as f64,
    );
    let side = (b * s * 4) as f64
        + if sh.flag("bias") {
            (sh["buckets"] * h) as f64 * el
        } else {
            0.0
        };
    if backward {
        // Reads dout, q, k, v, out, lse; writes dq, dk, dv.
        Cost {
            bytes: el * (4.0 * nq + 4.0 * nk + nlse) + side,
            flops: Some(2.5 * fwd_flops),
        }
    } else {
        // Reads q, k, v; writes out, lse.
        Cost {
            bytes: el * (2.0 * nq + 2.0 * nk + nlse) + side,
            flops: Some(fwd_flops),
        }
    }
}

/// Attention shapes of the unit tests (keys: [`ATTN_KEYS`]).
const ATTN_TESTS: Shapes = &[
    (
        "encoder self, padded, bidirectional bias",
        &[2, 11, 11, 3, 3, 5, 0, 1, 3, 0, 0, 1000, 8, 20],
    ),
    (
        "decoder self, causal, unidirectional bias",
        &[2, 11, 11, 3, 3, 5, 1, 1, 2, 0, 0, 370, 8, 20],
    ),
    (
        "cross attention, T != S, no bias",
        &[2, 7, 13, 3, 3, 5, 0, 0, 0, 3, 0, 370, 8, 20],
    ),
    (
        "grouped-query, causal, no bias",
        &[2, 9, 9, 4, 2, 5, 1, 0, 3, 0, 0, 370, 8, 20],
    ),
    (
        "rows longer than the block, T != S, bidirectional bias",
        &[1, 3, 200, 2, 2, 4, 0, 1, 29, 0, 0, 370, 8, 20],
    ),
    // Batch entry 1 sees no key: its rows have lse = -inf, output 0 and no gradient.
    (
        "fully padded batch entry, bidirectional bias",
        &[2, 5, 7, 2, 2, 3, 0, 1, 7, 0, 0, 1000, 8, 20],
    ),
    // Several query and key tiles of the flash kernels, a group of 3 query heads per KV head,
    // the widest head the flash kernels take.
    (
        "wide heads, many tiles, grouped-query, causal",
        &[2, 37, 37, 6, 2, 128, 1, 0, 7, 0, 0, 90, 8, 20],
    ),
    // T5-base's head width: the tensor-core forward, two 64-row query tiles.
    (
        "T5 head width 64, two query tiles, padded, bidirectional bias",
        &[2, 70, 70, 2, 2, 64, 0, 1, 29, 0, 0, 1000, 8, 20],
    ),
    (
        "many tiles, padded, bidirectional bias, odd head",
        &[1, 21, 50, 2, 1, 33, 0, 1, 6, 0, 0, 200, 8, 20],
    ),
    // One decoding step against a cache of 12 keys, 3 (entry 0) and 7 (entry 1) unwritten.
    (
        "one query against a KV cache, unidirectional bias with q_offset",
        &[2, 1, 12, 3, 3, 8, 0, 1, 7, 3, 8, 1000, 8, 20],
    ),
    // Heads wider than the flash kernels take: the flash setting falls back to GEMMs.
    (
        "heads wider than FLASH_MAX_D",
        &[1, 5, 6, 2, 2, 130, 1, 0, 0, 0, 0, 100, 8, 20],
    ),
];

/// Attention shapes of the doctor.
const ATTN_DOCTOR: Shapes = &[
    (
        "encoder (bias, padding)",
        &[2, 11, 11, 3, 3, 5, 0, 1, 3, 0, 0, 370, 8, 20],
    ),
    (
        "decoder (causal, bias)",
        &[2, 9, 9, 3, 3, 7, 1, 1, 0, 0, 0, 370, 8, 20],
    ),
    (
        "cross (T≠S, padding)",
        &[2, 7, 13, 2, 2, 6, 0, 0, 3, 0, 0, 370, 8, 20],
    ),
    (
        "gqa (causal)",
        &[1, 10, 10, 4, 2, 8, 1, 0, 0, 0, 0, 370, 8, 20],
    ),
    // T5's head width (tensor cores), more than one 64-row query tile.
    (
        "encoder d64 (bias, padding)",
        &[1, 67, 67, 2, 2, 64, 0, 1, 3, 0, 0, 370, 8, 20],
    ),
    // Llama's head width (tensor cores), grouped-query.
    (
        "gqa d128 (causal)",
        &[1, 40, 40, 2, 1, 128, 1, 0, 0, 0, 0, 370, 8, 20],
    ),
];

/// T5-large encoder self-attention (relative bias, padded keys) and a Llama-7B/8B-like causal GQA
/// layer (Llama-2-7B has Hkv = H; the 8 key/value heads are Llama-3-8B's). Scale 1/√D.
const ATTN_CUDA: Shapes = &[
    (
        "t5-large",
        &[8, 512, 512, 16, 16, 64, 0, 1, 64, 0, 0, 0, 32, 128],
    ),
    (
        "llama",
        &[4, 1024, 1024, 32, 8, 128, 1, 0, 0, 0, 0, 0, 32, 128],
    ),
];
const ATTN_VGPU: Shapes = &[
    ("t5-tiny", &[2, 32, 32, 4, 4, 32, 0, 1, 4, 0, 0, 0, 32, 128]),
    (
        "llama-tiny",
        &[2, 32, 32, 4, 2, 64, 1, 0, 0, 0, 0, 0, 32, 128],
    ),
];

const EMBED_TESTS: Shapes = &[
    ("", &[3, 5, 4, 37, 11, 2, 0]),
    ("", &[3, 5, 4, 37, 11, 2, 1]),
    ("", &[3, 5, 0, 37, 11, 2, 0]),
    ("", &[3, 5, 0, 37, 11, 2, 1]),
    ("", &[3, 5, 2, 130, 11, 2, 0]),
    ("", &[3, 5, 2, 130, 11, 2, 1]),
];

const ACT_TESTS: Shapes = &[
    ("relu", &[1001, 0, 0]),
    ("relu·gate", &[1001, 0, 1]),
    ("gelu_tanh", &[1001, 1, 0]),
    ("gelu_tanh·gate", &[1001, 1, 1]),
    ("silu", &[1001, 2, 0]),
    ("silu·gate", &[1001, 2, 1]),
];
const ACT_DOCTOR: Shapes = &[
    ("relu", &[871, 0, 0]),
    ("gelu_tanh·gate", &[871, 1, 1]),
    ("silu·gate", &[871, 2, 1]),
];

/// RoPE (forward and backward): n rows of h heads of width d; positions unordered and repeated,
/// the tables' last row included.
const ROPE_TESTS: Shapes = &[
    ("", &[7, 3, 10, 9]),
    ("", &[2, 1, 2, 1]),
    ("", &[5, 4, 64, 40]),
];
const ROPE_DOCTOR: Shapes = &[("", &[11, 3, 18, 13])];

/// EPT-MS fusion `ps (S, C)`, `lr (M, C)`: one prompt row, widths not multiples of a block.
const FUSION_TESTS: Shapes = &[
    ("attend", &[7, 13, 45, 0]),
    ("paper", &[7, 13, 45, 1]),
    ("attend", &[1, 1, 3, 0]),
    ("paper", &[1, 1, 3, 1]),
    ("attend", &[20, 37, 130, 0]),
    ("paper", &[20, 37, 130, 1]),
    ("attend", &[5, 300, 257, 0]),
    ("paper", &[5, 300, 257, 1]),
];
const FUSION_DOCTOR: Shapes = &[("attend", &[7, 13, 45, 0]), ("paper", &[7, 13, 45, 1])];

/// Gated experts `(N, C)` × E: one expert, one row.
const EXPERTS_TESTS: Shapes = &[
    ("", &[7, 45, 3]),
    ("", &[1, 3, 1]),
    ("", &[20, 130, 4]),
    ("", &[5, 257, 2]),
];

/// LAMP `u (L, R)`, `v (C, R)`, block p: no pooling (p = 1), the whole prompt (p = L).
const LAMP_TESTS: Shapes = &[
    ("", &[12, 5, 45, 3]),
    ("", &[4, 1, 3, 1]),
    ("", &[20, 8, 130, 20]),
    ("", &[100, 16, 257, 4]),
];

fn lamp_needs(sh: &Shape) -> Result<(), String> {
    ok_if(
        sh["p"] > 0 && sh["l"].is_multiple_of(sh["p"]),
        "lamp_pool needs p > 0 dividing l",
    )
}

fn adamw(sh: &Shape) -> AdamW {
    AdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: sh["step"] as u64,
        grad_scale: 0.5,
    }
}

// ---- the table --------------------------------------------------------------------------------------

/// Every op case, for backend `B` (the same list for every backend: a check pairs them by op).
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    vec![
        // ---- elementwise ----
        Case::<B>::new(
            "add_assign",
            &["n"],
            |sh, g| {
                g.acc("dst", sh["n"], 1.0);
                g.rand("src", sh["n"], 1.0);
            },
            |be, x, _| {
                let ([dst], [src]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.add_assign(dst, src);
            },
        )
        .tests(&[("", &[7]), ("", &[1001])])
        .doctor(&[("", &[871])]),
        Case::<B>::new(
            "add_bias",
            &["n", "f"],
            |sh, g| {
                g.acc("x", sh["n"] * sh["f"], 1.0);
                g.rand("bias", sh["f"], 1.0);
            },
            |be, x, sh| {
                let ([out], [bias]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.add_bias(out, bias, sh["n"], sh["f"]);
            },
        )
        .tests(&[("", &[7, 37]), ("", &[3, 300])])
        .doctor(&[("", &[13, 67])]),
        // f = 300: two blocks of columns, the second partly idle.
        Case::<B>::new(
            "bias_backward",
            &["n", "f"],
            |sh, g| {
                g.acc("dbias", sh["f"], 1.0);
                g.rand("dout", sh["n"] * sh["f"], 1.0);
            },
            |be, x, sh| {
                let ([dbias], [dout]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.bias_backward(dbias, dout, sh["n"], sh["f"]);
            },
        )
        .tests(&[("", &[7, 37]), ("", &[5, 300]), ("", &[1, 3])])
        .doctor(&[("", &[13, 67])]),
        // act: 0 ReLU, 1 GELU (tanh), 2 SiLU; gated: times a gate.
        Case::<B>::new(
            "gated_act_forward",
            &["len", "act", "gated"],
            |sh, g| {
                act_input(sh, g);
                if sh.flag("gated") {
                    g.rand("gate", sh["len"], 2.0);
                }
                g.out("out", sh["len"]);
            },
            |be, x, sh| {
                let ([out], [a, gate @ ..]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.gated_act_forward(out, a, gate.first(), activation(sh), sh["len"]);
            },
        )
        .tests(ACT_TESTS)
        .doctor(ACT_DOCTOR),
        Case::<B>::new(
            "gated_act_backward_dinp",
            &["len", "act", "gated"],
            |sh, g| {
                g.rand("dout", sh["len"], 1.0);
                act_input(sh, g);
                g.out("da", sh["len"]);
                if sh.flag("gated") {
                    g.rand("gate", sh["len"], 2.0);
                    g.out("dgate", sh["len"]);
                }
            },
            |be, x, sh| {
                let ([da, dgate @ ..], [dout, a, gate @ ..]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (act, len) = (activation(sh), sh["len"]);
                be.gated_act_backward_dinp(da, dgate.first_mut(), dout, a, gate.first(), act, len);
            },
        )
        .tests(ACT_TESTS)
        .doctor(ACT_DOCTOR),
        // ---- rows ----
        // c = 300: more columns than threads in the block.
        Case::<B>::new(
            "gather_rows",
            &["m", "r", "c"],
            |sh, g| {
                g.rand("table", sh["r"] * sh["c"], 1.0);
                let rows = g.ids(sh["m"], sh["r"]);
                g.index("rows", rows);
                g.out("out", sh["m"] * sh["c"]);
            },
            |be, x, sh| {
                let ([out], [table]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.gather_rows(out, table, &x.index[0], sh["m"], sh["c"]);
            },
        )
        .tests(&[("", &[5, 11, 37]), ("", &[9, 4, 300]), ("", &[1, 1, 1])])
        .doctor(&[("", &[5, 41, 33])])
        .needs(|sh| ok_if(sh["r"] > 0 || sh["m"] == 0, "gather_rows needs r > 0")),
        Case::<B>::new(
            "scatter_rows_add",
            &["m", "r", "c"],
            |sh, g| {
                g.acc("dtable", sh["r"] * sh["c"], 1.0);
                g.rand("dout", sh["m"] * sh["c"], 1.0);
                let rows = g.distinct_ids(sh["m"], sh["r"]);
                g.index("rows", rows);
            },
            |be, x, sh| {
                let ([dtable], [dout]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.scatter_rows_add(dtable, dout, &x.index[0], sh["m"], sh["c"]);
            },
        )
        .tests(&[("", &[5, 11, 37]), ("", &[4, 4, 300])])
        .doctor(&[("", &[5, 41, 33])])
        .needs(|sh| {
            ok_if(
                sh["m"] <= sh["r"],
                "scatter_rows_add needs m <= r (distinct rows)",
            )
        }),
        // The encoder input of a prompt-tuned step: `extra` update rows beyond T (M = T + extra),
        // which the forward skips and the backward zeroes.
        Case::<B>::new(
            "embed_prompt_forward",
            &["b", "t", "p", "c", "v", "extra", "update"],
            |sh, g| {
                let (b, t, p, c, v) = (sh["b"], sh["t"], sh["p"], sh["c"], sh["v"]);
                g.rand("table", v * c, 1.0);
                let ids = g.ids(b * t, v);
                g.index("ids", ids);
                g.rand("prompt", p * c, 1.0);
                if sh.flag("update") {
                    g.rand("update", (t + sh["extra"]) * c, 0.5);
                }
                g.out("out", b * (p + t) * c);
            },
            |be, x, sh| {
                let ([out], [table, prompt, update @ ..]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (b, t, p, c) = (sh["b"], sh["t"], sh["p"], sh["c"]);
                let ids = &x.index[0];
                be.embed_prompt_forward(
                    out,
                    table,
                    ids,
                    prompt,
                    update.first(),
                    EmbedPromptDims { b, t, p, c },
                );
            },
        )
        .tests(EMBED_TESTS)
        .doctor(&[("", &[3, 7, 5, 33, 41, 2, 1])])
        // DePT-like: 100 prompt rows + text rows, with the (T, C) update of the text embeddings.
        .lab(
            &[("tiny", &[3, 24, 8, 65, 500, 0, 1])],
            &[
                ("t5-large", &[8, 412, 100, 1024, 32128, 0, 1]),
                ("llama", &[4, 924, 100, 4096, 32000, 0, 1]),
            ],
        )
        .needs(|sh| ok_if(sh["v"] > 0, "embed_prompt_forward needs v > 0"))
        // Writes out (B, P+T, C); reads the B·T gathered table rows, prompt (P, C), update
        // (M, C) once, ids (B, T) i32.
        .cost(|sh, el| {
            let (b, t, p, c) = (sh["b"], sh["t"], sh["p"], sh["c"]);
            let update = if sh.flag("update") {
                (t + sh["extra"]) * c
            } else {
                0
            };
            Cost {
                bytes: (el * (b * (p + t) * c + b * t * c + p * c + update) + 4 * b * t) as f64,
                flops: None,
            }
        }),
        Case::<B>::new(
            "embed_prompt_backward",
            &["b", "t", "p", "c", "extra", "update"],
            |sh, g| {
                let (b, t, p, c) = (sh["b"], sh["t"], sh["p"], sh["c"]);
                g.rand("dout", b * (p + t) * c, 1.0);
                g.out("d_prompt", p * c);
                if sh.flag("update") {
                    g.out("d_update", (t + sh["extra"]) * c);
                }
            },
            |be, x, sh| {
                let ([d_prompt, d_update @ ..], [dout]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (b, t, p, c) = (sh["b"], sh["t"], sh["p"], sh["c"]);
                be.embed_prompt_backward(
                    d_prompt,
                    d_update.first_mut(),
                    dout,
                    EmbedPromptDims { b, t, p, c },
                );
            },
        )
        .tests(&[
            ("", &[3, 5, 4, 37, 2, 0]),
            ("", &[3, 5, 4, 37, 2, 1]),
            ("", &[3, 5, 0, 37, 2, 0]),
            ("", &[3, 5, 0, 37, 2, 1]),
            ("", &[3, 5, 2, 130, 2, 0]),
            ("", &[3, 5, 2, 130, 2, 1]),
        ])
        .doctor(&[("", &[3, 7, 5, 33, 2, 1])]),
        // ---- GEMM ----
        // ta, tb: transposed operands (each with its own alpha); acc: `+=`.
        Case::<B>::new(
            "matmul",
            &["m", "n", "k", "ta", "tb", "acc"],
            |sh, g| {
                let (m, n, k) = (sh["m"], sh["n"], sh["k"]);
                g.rand("a", m * k, 1.0);
                g.rand("b", k * n, 1.0);
                if sh.flag("acc") {
                    g.acc("out", m * n, 1.0);
                } else {
                    g.out("out", m * n);
                }
            },
            |be, x, sh| {
                let ([out], [a, b]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.matmul(out, a, b, gemm(sh));
            },
        )
        .tests(&[
            ("nn", &[7, 37, 13, 0, 0, 0]),
            ("nn +=", &[7, 37, 13, 0, 0, 1]),
            ("nt", &[7, 37, 13, 0, 1, 0]),
            ("nt +=", &[7, 37, 13, 0, 1, 1]),
            ("tn", &[7, 37, 13, 1, 0, 0]),
            ("tn +=", &[7, 37, 13, 1, 0, 1]),
            ("tt", &[7, 37, 13, 1, 1, 0]),
            ("tt +=", &[7, 37, 13, 1, 1, 1]),
        ])
        .doctor(&[
            ("nn", &[37, 29, 53, 0, 0, 0]),
            ("nt", &[37, 29, 53, 0, 1, 0]),
            ("tn +=", &[37, 29, 53, 1, 0, 1]),
        ]),
        Case::<B>::new(
            "linear_backward_dweight",
            &["n", "ic", "oc"],
            |sh, g| {
                let (n, ic, oc) = (sh["n"], sh["ic"], sh["oc"]);
                g.acc("dw", oc * ic, 1.0);
                g.rand("dout", n * oc, 1.0);
                g.rand("inp", n * ic, 1.0);
            },
            |be, x, sh| {
                let ([dw], [dout, inp]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.linear_backward_dweight(
                    dw,
                    dout,
                    inp,
                    LinearDims::new(sh["n"], sh["ic"], sh["oc"]),
                );
            },
        )
        .tests(&[("", &[9, 37, 13])])
        .doctor(&[("", &[9, 37, 13])]),
        // ---- normalisation ----
        // Odd row lengths, one shorter and one longer than the block.
        Case::<B>::new(
            "rmsnorm_forward",
            &["n", "c"],
            |sh, g| {
                g.rand("inp", sh["n"] * sh["c"], 2.0);
                g.rand("weight", sh["c"], 1.5);
                g.out("out", sh["n"] * sh["c"]);
                g.out("rstd", sh["n"]);
            },
            |be, x, sh| {
                let ([out, rstd], [inp, weight]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.rmsnorm_forward(
                    out,
                    rstd,
                    inp,
                    weight,
                    1e-6,
                    RmsNormDims {
                        n: sh["n"],
                        c: sh["c"],
                    },
                );
            },
        )
        .tests(&[("", &[7, 45]), ("", &[3, 301])])
        .doctor(&[("", &[9, 301])])
        // B·T rows of d_model.
        .lab(
            &[("tiny", &[64, 257])],
            &[("t5-large", &[4096, 1024]), ("llama", &[4096, 4096])],
        )
        // Reads inp (N, C) and weight (C); writes out (N, C) and rstd (N).
        .cost(|sh, el| Cost {
            bytes: (el * (2 * sh["n"] * sh["c"] + sh["c"] + sh["n"])) as f64,
            flops: None,
        }),
        Case::<B>::new(
            "rmsnorm_backward_dinp",
            &["n", "c"],
            |sh, g| {
                let (n, c) = (sh["n"], sh["c"]);
                g.acc("dinp", n * c, 1.0);
                g.rand("dout", n * c, 1.0);
                g.rand("inp", n * c, 2.0);
                g.rand("weight", c, 1.5);
                g.derived("rstd");
            },
            |be, x, sh| {
                let ([dinp], [dout, inp, weight, rstd]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.rmsnorm_backward_dinp(
                    dinp,
                    dout,
                    inp,
                    weight,
                    rstd,
                    RmsNormDims {
                        n: sh["n"],
                        c: sh["c"],
                    },
                );
            },
        )
        .derive("rmsnorm_forward", false)
        .tests(&[("", &[5, 77]), ("", &[2, 259])])
        .doctor(&[("", &[9, 301])]),
        // Off-centre rows, so that the mean matters.
        Case::<B>::new(
            "layernorm_forward",
            &["n", "c"],
            |sh, g| {
                let (n, c) = (sh["n"], sh["c"]);
                let inp = g.random(n * c, 2.0).into_iter().map(|v| v + 0.75).collect();
                g.input("inp", inp);
                g.rand("weight", c, 1.5);
                g.rand("bias", c, 1.0);
                g.out("out", n * c);
                g.out("mean", n);
                g.out("rstd", n);
            },
            |be, x, sh| {
                let ([out, mean, rstd], [inp, weight, bias]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (n, c) = (sh["n"], sh["c"]);
                be.layernorm_forward(
                    out,
                    mean,
                    rstd,
                    inp,
                    weight,
                    bias,
                    1e-5,
                    LayerNormDims { n, c },
                );
            },
        )
        .tests(&[("", &[7, 45]), ("", &[3, 301]), ("", &[2, 1])])
        .doctor(&[("", &[9, 301])]),
        // c = 301: two blocks of columns for dweight, the second partly idle.
        Case::<B>::new(
            "layernorm_backward",
            &["n", "c"],
            |sh, g| {
                let (n, c) = (sh["n"], sh["c"]);
                g.out("dinp", n * c);
                g.acc("dweight", c, 1.0);
                g.acc("dbias", c, 1.0);
                g.rand("dout", n * c, 1.0);
                let inp = g.random(n * c, 2.0).into_iter().map(|v| v - 0.5).collect();
                g.input("inp", inp);
                g.rand("weight", c, 1.5);
                g.derived("mean");
                g.derived("rstd");
            },
            |be, x, sh| {
                let ([dinp, dweight, dbias], [dout, inp, weight, mean, rstd]) =
                    (&mut x.outs[..], &x.ins[..])
                else {
                    bad!()
                };
                let (n, c) = (sh["n"], sh["c"]);
                be.layernorm_backward(
                    dinp,
                    dweight,
                    dbias,
                    dout,
                    inp,
                    weight,
                    mean,
                    rstd,
                    LayerNormDims { n, c },
                );
            },
        )
        .derive("layernorm_forward", false)
        .tests(&[("", &[5, 77]), ("", &[2, 259]), ("", &[33, 301])])
        .doctor(&[("", &[9, 301])]),
        Case::<B>::new(
            "softmax_rows_forward",
            &["n", "k"],
            |sh, g| {
                g.rand("inp", sh["n"] * sh["k"], 4.0);
                g.out("out", sh["n"] * sh["k"]);
            },
            |be, x, sh| {
                let ([out], [inp]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.softmax_rows_forward(out, inp, sh["n"], sh["k"]);
            },
        )
        .tests(&[("", &[7, 45]), ("", &[3, 301]), ("", &[4, 1])])
        .doctor(&[("", &[9, 45])]),
        Case::<B>::new(
            "softmax_rows_backward_dinp",
            &["n", "k"],
            |sh, g| {
                g.out("dinp", sh["n"] * sh["k"]);
                g.rand("dout", sh["n"] * sh["k"], 1.0);
                g.derived("out");
            },
            |be, x, sh| {
                let ([dinp], [dout, out]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                be.softmax_rows_backward_dinp(dinp, dout, out, sh["n"], sh["k"]);
            },
        )
        .derive("softmax_rows_forward", false)
        .tests(&[("", &[7, 45]), ("", &[3, 301])])
        .doctor(&[("", &[9, 45])]),
        // ---- attention ----
        // Keys: ATTN_KEYS; bias: the T5 relative bias (`buckets`, `maxdist`); pad / pad0: padded
        // keys of the last / first batch entry; qoff: position of query 0 (a KV cache);
        // scale in thousandths, 0: 1/√D.
        Case::<B>::new(
            "attention_forward",
            ATTN_KEYS,
            |sh, g| attn_inputs(sh, g, false),
            |be, x, sh| {
                let ([out, lse], [q, k, v, table @ ..]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (mask, bias) = (attn_mask(sh, &x.index[0]), rel_bias(sh, table.first()));
                be.attention_forward(out, lse, q, k, v, mask, bias, attn_scale(sh), attn_dims(sh));
            },
        )
        .attention_kernels()
        .tests(ATTN_TESTS)
        .doctor(ATTN_DOCTOR)
        .lab(ATTN_VGPU, ATTN_CUDA)
        .needs(attn_needs)
        .cost(|sh, el| attn_cost(sh, el, false)),
        // The forward's outputs reach the reference exact and the device rounded to its dtype
        // (as its forward would have stored them). The CPU rebuilds P from the saved lse, so a
        // bf16-rounded lse would scale each reference row by e^δ (about 1%) and blunt the check;
        // the GPU's GEMM path recomputes P, its flash kernels read lse in f32 (exact then) or
        // recompute it in bf16.
        Case::<B>::new(
            "attention_backward_dinp",
            ATTN_KEYS,
            |sh, g| attn_inputs(sh, g, true),
            |be, x, sh| {
                let ([dq, dk, dv], [dout, q, k, v, out, lse, table @ ..]) =
                    (&mut x.outs[..], &x.ins[..])
                else {
                    bad!()
                };
                let (mask, bias) = (attn_mask(sh, &x.index[0]), rel_bias(sh, table.first()));
                let (scale, dims) = (attn_scale(sh), attn_dims(sh));
                be.attention_backward_dinp(
                    dq, dk, dv, dout, q, k, v, out, lse, mask, bias, scale, dims,
                );
            },
        )
        .derive("attention_forward", true)
        .attention_kernels()
        .tests(ATTN_TESTS)
        .doctor(ATTN_DOCTOR)
        .lab(ATTN_VGPU, ATTN_CUDA)
        .needs(attn_needs)
        .cost(|sh, el| attn_cost(sh, el, true)),
        // ---- rotary position embedding ----
        // Positions unordered and repeated, the tables' last row included.
        Case::<B>::new(
            "rope_forward",
            &["n", "h", "d", "rows"],
            |sh, g| {
                let len = sh["n"] * sh["h"] * sh["d"];
                g.rand("inp", len, 1.0);
                rope_tables(sh, g);
                rope_positions(sh, g);
                g.out("out", len);
            },
            |be, x, sh| {
                let ([out], [inp, cos, sin]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (n, h, d, pos) = (sh["n"], sh["h"], sh["d"], &x.index[0]);
                be.rope_forward(out, inp, pos, cos, sin, RopeDims { n, h, d });
            },
        )
        .tests(ROPE_TESTS)
        .doctor(ROPE_DOCTOR)
        .needs(rope_needs),
        Case::<B>::new(
            "rope_backward_dinp",
            &["n", "h", "d", "rows"],
            |sh, g| {
                let len = sh["n"] * sh["h"] * sh["d"];
                g.rand("dout", len, 1.0);
                rope_tables(sh, g);
                rope_positions(sh, g);
                g.out("dinp", len);
            },
            |be, x, sh| {
                let ([dinp], [dout, cos, sin]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (n, h, d, pos) = (sh["n"], sh["h"], sh["d"], &x.index[0]);
                be.rope_backward_dinp(dinp, dout, pos, cos, sin, RopeDims { n, h, d });
            },
        )
        .tests(ROPE_TESTS)
        .doctor(ROPE_DOCTOR)
        .needs(rope_needs),
        // ---- quantised weights ----
        // Odd lengths: a partial last block, an odd last byte.
        Case::<B>::new(
            "nf4_dequantize",
            &["rows", "cols"],
            |sh, g| {
                let n = sh["rows"] * sh["cols"];
                let x = g.random(n, 2.0);
                g.nf4(quantize_nf4(&x));
                g.out("out", n);
            },
            |be, x, _| {
                let ([out], Some(q)) = (&mut x.outs[..], &x.nf4) else {
                    bad!()
                };
                be.nf4_dequantize(out, q);
            },
        )
        // The f32 kernel is bit-identical to the CPU; bf16 rounds once.
        .tol(|dtype, _| match dtype {
            DType::F32 => 1e-7,
            DType::Bf16 => op_tolerance(DType::Bf16),
        })
        .tests(&[("", &[3, 37]), ("", &[1, 64 * 300 + 37])])
        .doctor(&[("", &[1, 64 * 300 + 37])])
        // A Llama-7B attention projection and FFN weight.
        .lab(
            &[("tiny", &[37, 129])],
            &[("llama-attn", &[4096, 4096]), ("llama-ffn", &[11008, 4096])],
        )
        .needs(|sh| {
            ok_if(
                sh["rows"] * sh["cols"] > 0,
                "nf4_dequantize needs rows, cols > 0",
            )
        })
        // Reads the packed codes (N/2 bytes), the absmax codes (NB = N/64 bytes), the f32 absmax
        // scales (NB/256 · 4 bytes); writes out (N) in the dtype. (The 1 KiB map and the NF4
        // table are per launch.)
        .cost(|sh, el| {
            let n = sh["rows"] * sh["cols"];
            let nb = n.div_ceil(64);
            Cost {
                bytes: (n.div_ceil(2) + nb + 4 * nb.div_ceil(256) + n * el) as f64,
                flops: None,
            }
        }),
        // ---- prompt-method ops ----
        // EPT-MS fusion, paper: 0 the Attend reading, 1 the paper's.
        Case::<B>::new(
            "fusion_attention_forward",
            &["s", "m", "c", "paper"],
            |sh, g| {
                let (s, m, c) = (sh["s"], sh["m"], sh["c"]);
                g.rand("ps", s * c, 1.0);
                g.rand("lr", m * c, 1.0);
                g.out("out", s * c);
                g.out("probs", s * m);
            },
            |be, x, sh| {
                let ([out, probs], [ps, lr]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (s, m, c) = (sh["s"], sh["m"], sh["c"]);
                be.fusion_attention_forward(
                    out,
                    probs,
                    ps,
                    lr,
                    fusion_mode(sh),
                    FusionAttentionDims { s, m, c },
                );
            },
        )
        .tests(FUSION_TESTS)
        .doctor(FUSION_DOCTOR)
        // EPT-MS: s = 60 prompt rows attend to the m rows of the low-rank product.
        .lab(
            &[("tiny", &[7, 24, 65, 0]), ("tiny-paper", &[7, 24, 65, 1])],
            &[
                ("t5-large", &[60, 256, 1024, 0]),
                ("llama", &[60, 1024, 4096, 0]),
            ],
        )
        // Reads ps (S, C), lr (M, C); writes out (S, C), probs (S, M).
        // FLOPs: scores ps·lrᵀ 2·S·M·C, plus W·lr 2·S·M·C for Attend (Paper scales rows).
        .cost(|sh, el| {
            let (s, m, c) = (sh["s"], sh["m"], sh["c"]);
            let per = if sh.flag("paper") { 2.0 } else { 4.0 };
            Cost {
                bytes: (el * (2 * s * c + m * c + s * m)) as f64,
                flops: Some(per * (s * m * c) as f64),
            }
        }),
        // The backward from the forward's saved probabilities, rounded, on both sides.
        Case::<B>::new(
            "fusion_attention_backward",
            &["s", "m", "c", "paper"],
            |sh, g| {
                let (s, m, c) = (sh["s"], sh["m"], sh["c"]);
                g.out("d_ps", s * c);
                g.out("d_lr", m * c);
                g.rand("dout", s * c, 1.0);
                g.rand("ps", s * c, 1.0);
                g.rand("lr", m * c, 1.0);
                g.derived("probs");
            },
            |be, x, sh| {
                let ([d_ps, d_lr], [dout, ps, lr, probs]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (s, m, c, mode) = (sh["s"], sh["m"], sh["c"], fusion_mode(sh));
                be.fusion_attention_backward(
                    d_ps,
                    d_lr,
                    dout,
                    ps,
                    lr,
                    probs,
                    mode,
                    FusionAttentionDims { s, m, c },
                );
            },
        )
        .derive("fusion_attention_forward", false)
        .tests(FUSION_TESTS)
        .doctor(FUSION_DOCTOR),
        Case::<B>::new(
            "gated_experts_forward",
            &["n", "c", "e"],
            |sh, g| {
                let (n, c, e) = (sh["n"], sh["c"], sh["e"]);
                let logits = g.random(n * e, 2.0);
                g.input("gate", softmax_rows(&logits, e));
                for _ in 0..e {
                    g.rand("expert", n * c, 1.0);
                }
                g.out("out", n * c);
            },
            |be, x, sh| {
                let ([out], [gate, experts @ ..]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let experts: Vec<&B::Tensor> = experts.iter().collect();
                be.gated_experts_forward(
                    out,
                    gate,
                    &experts,
                    GatedExpertsDims {
                        n: sh["n"],
                        c: sh["c"],
                    },
                );
            },
        )
        .tests(EXPERTS_TESTS)
        .doctor(&[("", &[7, 45, 3])])
        .lab(
            &[("tiny", &[7, 65, 4])],
            &[("t5-large", &[60, 1024, 4]), ("llama", &[60, 4096, 4])],
        )
        // Reads gate (N, E) and E experts (N, C); writes out (N, C).
        .cost(|sh, el| {
            let (n, c, e) = (sh["n"], sh["c"], sh["e"]);
            Cost {
                bytes: (el * (n * e + e * n * c + n * c)) as f64,
                flops: None,
            }
        }),
        Case::<B>::new(
            "gated_experts_backward",
            &["n", "c", "e"],
            |sh, g| {
                let (n, c, e) = (sh["n"], sh["c"], sh["e"]);
                g.rand("dout", n * c, 1.0);
                let logits = g.random(n * e, 2.0);
                g.input("gate", softmax_rows(&logits, e));
                g.out("d_gate", n * e);
                for i in 0..e {
                    g.rand("expert", n * c, 1.0);
                    g.out(&format!("d_expert{i}"), n * c);
                }
            },
            |be, x, sh| {
                let ([d_gate, d_experts @ ..], [dout, gate, experts @ ..]) =
                    (&mut x.outs[..], &x.ins[..])
                else {
                    bad!()
                };
                let experts: Vec<&B::Tensor> = experts.iter().collect();
                let (n, c) = (sh["n"], sh["c"]);
                be.gated_experts_backward(
                    d_gate,
                    d_experts,
                    dout,
                    gate,
                    &experts,
                    GatedExpertsDims { n, c },
                );
            },
        )
        .tests(EXPERTS_TESTS)
        .doctor(&[("", &[7, 45, 3])]),
        Case::<B>::new(
            "lamp_pool_forward",
            &["l", "r", "c", "p"],
            |sh, g| {
                let (l, r, c, p) = (sh["l"], sh["r"], sh["c"], sh["p"]);
                g.rand("u", l * r, 1.0);
                g.rand("q", r, 1.5);
                g.rand("v", c * r, 1.0);
                g.out("out", l / p * c);
            },
            |be, x, sh| {
                let ([out], [u, q, v]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (l, r, c, p) = (sh["l"], sh["r"], sh["c"], sh["p"]);
                be.lamp_pool_forward(out, u, q, v, LampPoolDims { l, r, c, p });
            },
        )
        .tests(LAMP_TESTS)
        .doctor(&[("", &[12, 5, 45, 3])])
        .lab(
            &[("tiny", &[12, 5, 65, 3])],
            &[
                ("t5-large", &[100, 8, 1024, 1]),
                ("llama", &[100, 8, 4096, 4]),
            ],
        )
        .needs(lamp_needs)
        // Reads u (L, R), q (R), v (C, R); writes out (L/p, C).
        // FLOPs: pooling L·R adds, then the (L/p, R)·(R, C) product 2·(L/p)·R·C.
        .cost(|sh, el| {
            let (l, r, c, p) = (sh["l"], sh["r"], sh["c"], sh["p"]);
            Cost {
                bytes: (el * (l * r + r + c * r + l / p * c)) as f64,
                flops: Some((2 * (l / p) * r * c + l * r) as f64),
            }
        }),
        // The backward adds to random gradients.
        Case::<B>::new(
            "lamp_pool_backward",
            &["l", "r", "c", "p"],
            |sh, g| {
                let (l, r, c, p) = (sh["l"], sh["r"], sh["c"], sh["p"]);
                g.acc("du", l * r, 1.0);
                g.acc("dq", r, 1.0);
                g.acc("dv", c * r, 1.0);
                g.rand("dout", l / p * c, 1.0);
                g.rand("u", l * r, 1.0);
                g.rand("q", r, 1.5);
                g.rand("v", c * r, 1.0);
            },
            |be, x, sh| {
                let ([du, dq, dv], [dout, u, q, v]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (l, r, c, p) = (sh["l"], sh["r"], sh["c"], sh["p"]);
                be.lamp_pool_backward(du, dq, dv, dout, u, q, v, LampPoolDims { l, r, c, p });
            },
        )
        .tests(LAMP_TESTS)
        .doctor(&[("", &[12, 5, 45, 3])])
        .needs(lamp_needs),
        // ---- optimiser ----
        // 300_001 elements need more than the 1024 blocks sum_squares launches: grid-stride. The
        // squares of stored values are exact in f32 for both dtypes: only the f32 accumulation
        // differs, so the tolerance is tight for bf16 too.
        Case::<B>::new(
            "sum_squares",
            &["n"],
            |sh, g| {
                g.rand("x", sh["n"], 2.0);
                g.scalar("sum");
            },
            |be, x, _| {
                let [xs] = &x.ins[..] else { bad!() };
                x.scalar = be.sum_squares(xs);
            },
        )
        .tol(|_, _| 1e-5)
        .tests(&[("", &[1]), ("", &[7]), ("", &[1001]), ("", &[300_001])])
        .doctor(&[("", &[1037])]),
        // One step from random state (zero moments at step 1). The parameter is the master
        // rounded to the storage dtype; the state is f32 on every backend: as tight as f32
        // allows, except that β2 reaches the kernel as f32: 1 − β2 = 1 − 0.999f is off by 1.3e-5
        // relative.
        Case::<B>::new(
            "adamw_step",
            &["n", "step"],
            |sh, g| {
                let n = sh["n"];
                g.out_rounded("param", n);
                let master = g.random(n, 1.0);
                g.state("master", master);
                let (m, v) = if sh["step"] <= 1 {
                    (vec![0.0; n], vec![0.0; n])
                } else {
                    let m = g.random(n, 0.1);
                    let v = g.random(n, 0.01).into_iter().map(f32::abs).collect();
                    (m, v)
                };
                g.state("m", m);
                g.state("v", v);
                g.rand("grad", n, 1.0);
            },
            |be, x, sh| {
                let ([param], [grad], [master, m, v]) =
                    (&mut x.outs[..], &x.ins[..], &mut x.states[..])
                else {
                    bad!()
                };
                be.adamw_step(param, master, m, v, grad, adamw(sh));
            },
        )
        .tol(|dtype, output| match output {
            "master" | "m" => 1e-6,
            "v" => 3e-5,
            _ => op_tolerance(dtype),
        })
        .tests(&[("step 1", &[1001, 1]), ("step 2", &[1001, 2])])
        .doctor(&[("step 1", &[1037, 1]), ("step 2", &[1037, 2])])
        .needs(|sh| ok_if(sh["step"] >= 1, "adamw_step needs step >= 1")),
        // ---- loss ----
        // v = 1001: more logits than threads in the block, and not a multiple of it.
        Case::<B>::new(
            "cross_entropy_forward_backward",
            &["m", "v"],
            |sh, g| {
                let (m, v) = (sh["m"], sh["v"]);
                g.rand("logits", m * v, 5.0);
                let targets = g.ids(m, v);
                g.index("targets", targets);
                g.out("losses", m);
                g.out("dlogits", m * v);
            },
            |be, x, sh| {
                let ([losses, dlogits], [logits]) = (&mut x.outs[..], &x.ins[..]) else {
                    bad!()
                };
                let (targets, m, v) = (&x.index[0], sh["m"], sh["v"]);
                be.cross_entropy_forward_backward(
                    losses,
                    dlogits,
                    logits,
                    targets,
                    0.25,
                    CrossEntropyDims { m, v },
                );
            },
        )
        .tests(&[("", &[5, 37]), ("", &[3, 1001])])
        .doctor(&[("", &[7, 1001])])
        // Label rows only: T5 8 × 128 targets; Llama-3 vocabulary, 4 × 128 targets.
        .lab(
            &[("tiny", &[7, 1001])],
            &[("t5-large", &[1024, 32128]), ("llama3", &[512, 128256])],
        )
        .needs(|sh| ok_if(sh["v"] > 0, "cross_entropy_forward_backward needs v > 0"))
        // Reads logits (M, V), targets (M) i32; writes dlogits (M, V), losses (M).
        .cost(|sh, el| {
            let (m, v) = (sh["m"], sh["v"]);
            Cost {
                bytes: (el * (2 * m * v + m) + 4 * m) as f64,
                flops: None,
            }
        }),
    ]
}

fn fusion_mode(sh: &Shape) -> FusionMode {
    if sh.flag("paper") {
        FusionMode::Paper
    } else {
        FusionMode::Attend
    }
}
