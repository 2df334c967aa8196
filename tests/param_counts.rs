//! Every parameter count of ../shared/methods.md, reproduced exactly (table-driven over the
//! papers' settings in src/prompt/table.rs), plus the LAMP PT-ratio and option validation.

use fastpt::prompt::table::{paper_rows, paper_table_markdown, thousands};
use fastpt::prompt::MethodConfig;

#[test]
fn every_methods_md_count_is_reproduced() {
    let mut checked = 0;
    for row in paper_rows() {
        let counts = row.counts().unwrap();
        if let Some(t) = row.expected_train {
            assert_eq!(
                counts.train, t,
                "{} {} [{}]: train-time",
                row.shape, row.method, row.options
            );
            checked += 1;
        }
        if let Some(s) = row.expected_stored {
            assert_eq!(
                counts.stored, s,
                "{} {} [{}]: stored",
                row.shape, row.method, row.options
            );
            checked += 1;
        }
    }
    // PT 4, P-Tuning 3, Residual 6, DPT 3, DePT 2, EPT 2, LAMP 3 + 1 (llama l=100) + 8 (sweeps),
    // xpt 6 (n = 1 and 10).
    assert_eq!(
        checked, 38,
        "a figure of methods.md dropped out of the table"
    );
}

#[test]
fn lamp_vs_pt_ratio_on_llama_at_l_10000_is_363_2() {
    let d = 4096;
    let pt = MethodConfig::from_toml("pt", "prompt_len = 10000")
        .unwrap()
        .param_counts(d, 256)
        .train;
    let lamp = MethodConfig::from_toml("lamp", "prompt_len = 10000\nrank = 8")
        .unwrap()
        .param_counts(d, 256)
        .train;
    assert_eq!(format!("{:.1}", pt as f64 / lamp as f64), "363.2");
}

#[test]
fn table_prints_every_row_and_marks_matches() {
    let table = paper_table_markdown().unwrap();
    assert_eq!(table.lines().count(), 2 + paper_rows().len());
    assert!(
        table.contains("| t5-base | lamp | prompt_len = 100, rank = 8 | 6,952 |"),
        "{table}"
    );
    assert!(!table.contains('✗'), "{table}");
    assert_eq!(thousands(1_656_836), "1,656,836");
    assert_eq!(thousands(512), "512");
}

#[test]
fn invalid_options_name_the_option_and_both_values() {
    let cases = [
        (
            "ept",
            "prompt_len = 80\nsource_len = 60",
            "prompt_len s = 80 > source_len l = 60",
        ),
        ("dept", "rank = 300", "rank r = 300 > min(m = 256, d = 768)"),
        (
            "lamp",
            "prompt_len = 100\npool = 3",
            "prompt_len l = 100 is not a multiple of pool p = 3",
        ),
        ("ept", "experts = 0", "experts (N_e) = 0"),
        ("residual", "bottleneck = 0", "bottleneck (h) = 0"),
        ("xpt", "hidden = 0", "hidden (h) = 0"),
    ];
    for (method, options, needle) in cases {
        let err = MethodConfig::from_toml(method, options)
            .unwrap()
            .validate(768, 256)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{method} [{options}]: {err}");
    }
    let err = MethodConfig::from_toml("prefix", "")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown method `prefix`") && err.contains("lamp"),
        "{err}"
    );
    let err = MethodConfig::from_toml("ept", "fusion = \"sum\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("[ept]") && err.contains("sum"), "{err}");
    let err = MethodConfig::from_toml("lamp", "ranks = 8")
        .unwrap_err()
        .to_string();
    assert!(err.contains("ranks"), "{err}");
}
