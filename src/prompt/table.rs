//! The papers' parameter counts, reproduced: every method at the settings the papers use, on
//! the widths of T5-small/base/large and Llama-2-7B, next to the figures of ../shared/methods.md.
//! `fastpt params --table` prints it; tests/param_counts.rs checks every figure.

use super::config::{MethodConfig, ParamCounts};
use crate::error::Result;

/// Maximum input length m of the papers' settings.
pub const PAPER_MAX_LEN: usize = 256;

/// One row: a method at one setting on one model width.
pub struct PaperRow {
    pub shape: &'static str,
    pub d: usize,
    pub method: &'static str,
    /// The method's TOML options (papers' values; the rest are defaults).
    pub options: &'static str,
    /// Figures from methods.md: train-time and, where it differs, stored.
    pub expected_train: Option<usize>,
    pub expected_stored: Option<usize>,
}

const SHAPES: &[(&str, usize)] = &[
    ("t5-small", 512),
    ("t5-base", 768),
    ("t5-large", 1024),
    ("llama-2-7b", 4096),
];

/// The model width d of a shape name: the built-in shapes, and Llama-2-7B (the papers' Llama
/// shape; counting parameters only needs d).
pub fn shape_width(name: &str) -> Result<usize> {
    match SHAPES.iter().find(|s| s.0 == name) {
        Some(&(_, d)) => Ok(d),
        None => crate::model::shapes::shape_width(name).map_err(|_| {
            let names: Vec<&str> = crate::model::shapes::builtin_shapes().collect();
            crate::error::Error::Input(format!(
                "unknown shape `{name}`; shapes: {}, llama-2-7b",
                names.join(", ")
            ))
        }),
    }
}

/// The rows of the table, shape by shape.
pub fn paper_rows() -> Vec<PaperRow> {
    let mut rows = Vec::new();
    for &(shape, d) in SHAPES {
        // Expected figure of a (shape-indexed) list: small, base, large, llama.
        let pick =
            |figs: [Option<usize>; 4]| figs[SHAPES.iter().position(|s| s.0 == shape).unwrap_or(0)];
        let mut row = |method, options, train: [Option<usize>; 4], stored: [Option<usize>; 4]| {
            rows.push(PaperRow {
                shape,
                d,
                method,
                options,
                expected_train: pick(train),
                expected_stored: pick(stored),
            })
        };
        const NONE: [Option<usize>; 4] = [None; 4];
        row(
            "pt",
            "prompt_len = 100",
            [Some(51_200), Some(76_800), Some(102_400), Some(409_600)],
            NONE,
        );
        row(
            "ptuning",
            "prompt_len = 10",
            [Some(793_088), Some(1_779_456), Some(3_159_040), None],
            NONE,
        );
        row(
            "residual",
            "prompt_len = 100\nbottleneck = 400",
            [Some(462_736), Some(693_904), Some(925_072), None],
            NONE,
        );
        row(
            "residual",
            "prompt_len = 10\nbottleneck = 400",
            [Some(416_656), Some(624_784), Some(832_912), None],
            NONE,
        );
        row(
            "dpt",
            "prompt_len = 100\nrank = 10",
            [Some(6_120), Some(8_680), Some(11_240), None],
            NONE,
        );
        row(
            "dept",
            "prompt_len = 60\nrank = 30",
            [None, Some(76_800), None, None],
            NONE,
        );
        row(
            "dept",
            "prompt_len = 40\nrank = 45",
            [None, Some(76_800), None, None],
            NONE,
        );
        row(
            "ept",
            "prompt_len = 60\nrank = 30\nexperts = 4",
            [None, Some(1_656_836), None, None],
            [None, Some(76_800), None, None],
        );
        row(
            "lamp",
            "prompt_len = 100\nrank = 8",
            [Some(4_904), Some(6_952), Some(9_000), Some(33_576)],
            NONE,
        );
        for (l, large, llama) in [
            ("prompt_len = 20\nrank = 8", 8_360, 32_936),
            ("prompt_len = 1000\nrank = 8", 16_200, 40_776),
            ("prompt_len = 5000\nrank = 8", 48_200, 72_776),
            ("prompt_len = 10000\nrank = 8", 88_200, 112_776),
        ] {
            if shape == "t5-large" || shape == "llama-2-7b" {
                row("lamp", l, [None, None, Some(large), Some(llama)], NONE);
            }
        }
        row(
            "xpt",
            "repeats = 1",
            [Some(1_536), Some(2_304), Some(3_072), None],
            NONE,
        );
        row(
            "xpt",
            "repeats = 10",
            [Some(1_536), Some(2_304), Some(3_072), None],
            NONE,
        );
    }
    rows
}

impl PaperRow {
    pub fn config(&self) -> Result<MethodConfig> {
        MethodConfig::from_toml(self.method, self.options)
    }

    pub fn counts(&self) -> Result<ParamCounts> {
        let cfg = self.config()?;
        cfg.validate(self.d, PAPER_MAX_LEN)?;
        Ok(cfg.param_counts(self.d, PAPER_MAX_LEN))
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The table as markdown: computed counts, methods.md's figures, and the PT/method ratio.
pub fn paper_table_markdown() -> Result<String> {
    let mut out = String::from(
        "| shape | method | setting | train-time | stored | methods.md | PT / method |\n\
         | --- | --- | --- | ---: | ---: | --- | ---: |\n",
    );
    for row in paper_rows() {
        let counts = row.counts()?;
        let expected = match (row.expected_train, row.expected_stored) {
            (Some(t), Some(s)) => format!("{} / {}", thousands(t), thousands(s)),
            (Some(t), None) => thousands(t),
            _ => String::new(),
        };
        let check = match row.expected_train {
            Some(t)
                if t == counts.train && row.expected_stored.is_none_or(|s| s == counts.stored) =>
            {
                " ✓"
            }
            Some(_) => " ✗",
            None => "",
        };
        let pt = MethodConfig::from_toml("pt", &row.options.replace("rank = 8", ""))
            .ok()
            .filter(|_| row.method == "lamp")
            .map(|pt| pt.param_counts(row.d, PAPER_MAX_LEN).train as f64 / counts.train as f64);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {}{} | {} |\n",
            row.shape,
            row.method,
            row.options.replace('\n', ", "),
            thousands(counts.train),
            thousands(counts.stored),
            expected,
            check,
            pt.map(|r| format!("{r:.1}")).unwrap_or_default(),
        ));
    }
    Ok(out)
}
