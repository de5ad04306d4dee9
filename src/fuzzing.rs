//! Seeded inputs for the parsers' fuzz tests (`cargo test fuzz_`): valid inputs mutated the
//! way a hostile or broken peer would (bit flips, splices, truncations, hostile JSON tokens,
//! deep nesting), and random JSON. Every run is bounded: `HERALD_FUZZ_ITERS` inputs per
//! parser (default 20,000). `HERALD_FUZZ_SEED` replays a run; a failure names its seed and
//! input. The socket-level fuzz client (`examples/fuzzclient.rs`) builds its frames with it
//! too.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::Instant;

use serde_json::{Map, Value};

const DEFAULT_ITERS: usize = 20_000;

/// Tokens that break naive parsers: quotes, escapes, huge and negative numbers, lone
/// surrogates, control bytes, the Engine.IO record separator, and herald's own field names.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "0",
    "1e400",
    "-0.0",
    "18446744073709551615",
    "18446744073709551616",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\u{0}",
    "\u{1e}",
    "\u{feff}",
    "\r\n",
    "\"sessionId\"",
    "\"event\"",
    "\"events\"",
    "\"data\"",
    "\"lastSeq\"",
    "\"epoch\"",
    "\"idempotencyKey\"",
    "\"status\"",
    "\"progress\"",
    "\"completed\"",
    "data: ",
    "[DONE]",
    "=",
    "*",
    "+",
    " ",
];

/// Field names random JSON objects are built from: herald's own, so that generated values
/// reach past the first "unknown field" check.
const KEYS: &[&str] = &[
    "sessionId",
    "event",
    "events",
    "data",
    "idempotencyKey",
    "lastSeq",
    "epoch",
    "status",
    "progress",
    "prompts",
    "result",
    "error",
    "code",
    "promptId",
    "modelName",
    "clarificationId",
    "question",
    "answer",
    "message",
    "content",
    "choices",
    "delta",
    "done",
    "timestamp",
];

pub struct Fuzz {
    name: &'static str,
    rng: fastrand::Rng,
    seed: u64,
    iters: usize,
}

impl Fuzz {
    /// A parser's fuzz run, its seed and size from the environment.
    pub fn new(name: &'static str) -> Self {
        let seed = env_number("HERALD_FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..));
        let iters = env_number("HERALD_FUZZ_ITERS").map_or(DEFAULT_ITERS, |n| n as usize);
        Self::with_seed(name, seed, iters)
    }

    pub fn with_seed(name: &'static str, seed: u64, iters: usize) -> Self {
        Self {
            name,
            rng: fastrand::Rng::with_seed(seed),
            seed,
            iters,
        }
    }

    /// For the fuzz client's own choices (which transport, how many frames).
    #[allow(dead_code)]
    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }

    /// Runs `check` on `iters` inputs derived from `seeds`; returns how many ran. A panic
    /// in `check` (the parser's or a failed property) is re-raised with the seed and input.
    pub fn run(mut self, seeds: &[&[u8]], mut check: impl FnMut(&[u8])) -> usize {
        let started = Instant::now();
        for _ in 0..self.iters {
            let input = self.input(seeds);
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
                eprintln!(
                    "fuzz {}: failed with HERALD_FUZZ_SEED={} on input {:?}",
                    self.name,
                    self.seed,
                    String::from_utf8_lossy(&input[..input.len().min(2_000)])
                );
                resume_unwind(panic);
            }
        }
        eprintln!(
            "fuzz {}: {} inputs in {:.2?}, seed {}, 0 failures",
            self.name,
            self.iters,
            started.elapsed(),
            self.seed
        );
        self.iters
    }

    /// A seed as is, mutated, spliced with another, random JSON, or random bytes.
    pub fn input(&mut self, seeds: &[&[u8]]) -> Vec<u8> {
        let pick = |rng: &mut fastrand::Rng| seeds[rng.usize(..seeds.len())].to_vec();
        match self.rng.u8(..100) {
            0..5 => pick(&mut self.rng),
            5..75 => {
                let mut input = pick(&mut self.rng);
                for _ in 0..self.rng.usize(1..5) {
                    self.mutate(&mut input, seeds);
                }
                input
            }
            75..92 => serde_json::to_vec(&self.json(4)).expect("a Value serializes"),
            92..96 => deeply_nested(self.rng.usize(100..3_000)),
            _ => {
                let len = self.rng.usize(0..256);
                std::iter::repeat_with(|| self.rng.u8(..))
                    .take(len)
                    .collect()
            }
        }
    }

    fn mutate(&mut self, input: &mut Vec<u8>, seeds: &[&[u8]]) {
        let len = input.len();
        let at = |rng: &mut fastrand::Rng| rng.usize(..=len);
        match self.rng.u8(..8) {
            0 if len > 0 => {
                let i = self.rng.usize(..len);
                input[i] ^= 1 << self.rng.u8(..8);
            }
            1 if len > 0 => {
                let i = self.rng.usize(..len);
                input[i] = self.rng.u8(..);
            }
            2 => {
                let token = TOKENS[self.rng.usize(..TOKENS.len())];
                let i = at(&mut self.rng);
                input.splice(i..i, token.bytes());
            }
            3 if len > 0 => {
                let from = self.rng.usize(..len);
                let to = self.rng.usize(from..=len);
                input.drain(from..to);
            }
            4 if len > 0 => {
                let from = self.rng.usize(..len);
                let to = self.rng.usize(from..=len.min(from + 64));
                let copy = input[from..to].to_vec();
                let i = at(&mut self.rng);
                input.splice(i..i, copy);
            }
            5 => input.truncate(at(&mut self.rng)),
            6 => {
                let other = seeds[self.rng.usize(..seeds.len())];
                let cut = self.rng.usize(..=other.len());
                input.truncate(at(&mut self.rng));
                input.extend_from_slice(&other[cut..]);
            }
            _ => {
                // A JSON value in place of a range: type confusion in a known shape.
                let value = serde_json::to_vec(&self.json(2)).expect("a Value serializes");
                let i = at(&mut self.rng);
                input.splice(i..i, value);
            }
        }
    }

    /// A random JSON value at most `depth` deep, with herald's field names as keys.
    pub fn json(&mut self, depth: u8) -> Value {
        let leaf = depth == 0 || self.rng.u8(..3) == 0;
        match (leaf, self.rng.u8(..7)) {
            (_, 0) => Value::Null,
            (_, 1) => Value::Bool(self.rng.bool()),
            (_, 2) => match self.rng.u8(..4) {
                0 => Value::from(self.rng.u64(..)),
                1 => Value::from(self.rng.i64(..)),
                2 => Value::from(self.rng.u8(..)),
                _ => serde_json::Number::from_f64(self.rng.f64() * 1e6)
                    .map_or(Value::Null, Value::Number),
            },
            (true, _) | (false, 3) => Value::String(self.string()),
            (false, 4) => Value::Array(
                (0..self.rng.usize(..5))
                    .map(|_| self.json(depth - 1))
                    .collect(),
            ),
            (false, _) => {
                let mut fields = Map::new();
                for _ in 0..self.rng.usize(..6) {
                    let key = KEYS[self.rng.usize(..KEYS.len())].to_owned();
                    fields.insert(key, self.json(depth - 1));
                }
                Value::Object(fields)
            }
        }
    }

    fn string(&mut self) -> String {
        match self.rng.u8(..6) {
            0 => String::new(),
            1 => "x".repeat(self.rng.usize(100..600)),
            2 => TOKENS[self.rng.usize(..TOKENS.len())].to_owned(),
            3 => (0..self.rng.usize(1..12))
                .map(|_| self.rng.char(..))
                .collect(),
            _ => (0..self.rng.usize(1..24))
                .map(|_| self.rng.alphanumeric())
                .collect(),
        }
    }
}

fn deeply_nested(depth: usize) -> Vec<u8> {
    let mut input = b"{\"data\":".to_vec();
    input.extend(std::iter::repeat_n(b'[', depth));
    input.extend(std::iter::repeat_n(b']', depth));
    input.push(b'}');
    input
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}
