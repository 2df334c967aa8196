//! The papers' metrics on generated (or rank-classified) label texts.

use crate::error::{Error, Result};

pub use crate::data::metric::Metric;

/// What the metrics know about one gold example.
#[derive(Debug, Clone, Copy)]
pub struct Gold<'a> {
    /// The gold label text (a label word such as "entailment", an index such as "1", or an STS-B number "3.4").
    pub target: &'a str,
    /// ReCoRD: every acceptable answer; empty elsewhere (then `target` is the only answer).
    pub answers: &'a [String],
    /// MultiRC: the id of the question this answer option belongs to; None elsewhere.
    pub group: Option<&'a str>,
}

/// Scores predictions against golds (same length, at least one, else Error::Input naming the counts).
/// `classes` are the task's label texts in index order (empty for STS-B and ReCoRD); binary
/// metrics take classes[1] as the positive class. Values are fractions in [0, 1] (correlations in [-1, 1]).
///
/// For the label metrics (all but `pearson_spearman` and `record`) every gold target must be one of
/// `classes` after [`normalize`] when `classes` is not empty: a gold outside the label set means
/// the task and its data disagree, and scoring would silently count it wrong. The binary metrics
/// (`f1`, `matthews`, `multirc`) need exactly two classes, `f1_macro` at least one.
pub fn score(
    metric: Metric,
    preds: &[String],
    golds: &[Gold<'_>],
    classes: &[String],
) -> Result<Vec<(String, f64)>> {
    check_lengths(preds.len(), golds.len())?;
    let targets: Vec<&str> = golds.iter().map(|g| g.target).collect();
    let out = match metric {
        Metric::Accuracy => {
            check_golds_in_classes(&targets, classes)?;
            vec![("accuracy", accuracy(preds, &targets)?)]
        }
        Metric::F1 => {
            let positive = binary_positive(metric, classes)?;
            check_golds_in_classes(&targets, classes)?;
            vec![("f1", f1_binary(preds, &targets, positive)?)]
        }
        Metric::F1Macro => {
            if classes.is_empty() {
                return Err(Error::Input(
                    "metric f1_macro needs the task's classes, but none were given".into(),
                ));
            }
            check_golds_in_classes(&targets, classes)?;
            vec![("f1_macro", f1_macro(preds, &targets, classes)?)]
        }
        Metric::Matthews => {
            let positive = binary_positive(metric, classes)?;
            check_golds_in_classes(&targets, classes)?;
            vec![("matthews", matthews(preds, &targets, positive)?)]
        }
        Metric::PearsonSpearman => {
            // An unparsable (or non-finite) prediction is a generation failure, scored as 0.0
            // (the bottom of STS-B's 0..5 scale) rather than dropped, so every example counts.
            let x: Vec<f64> = preds
                .iter()
                .map(|p| match p.trim().parse::<f64>() {
                    Ok(v) if v.is_finite() => v,
                    _ => 0.0,
                })
                .collect();
            // A gold that is not a number is bad data, not a bad model: an error.
            let y = targets
                .iter()
                .enumerate()
                .map(|(i, t)| match t.trim().parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ => Err(Error::Input(format!(
                        "gold {i}: target {t:?} is not a finite number (pearson_spearman needs numeric golds)"
                    ))),
                })
                .collect::<Result<Vec<f64>>>()?;
            vec![
                ("pearson", pearson(&x, &y)?),
                ("spearman", spearman(&x, &y)?),
            ]
        }
        Metric::MultiRc => {
            let positive = binary_positive(metric, classes)?;
            check_golds_in_classes(&targets, classes)?;
            let (f1a, em) = multirc(preds, golds, positive)?;
            vec![("f1a", f1a), ("em", em)]
        }
        Metric::Record => {
            let (f1, em) = record(preds, golds)?;
            vec![("f1", f1), ("em", em)]
        }
    };
    Ok(out.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// SQuAD-style answer normalisation: lowercase, drop ASCII punctuation (Python's
/// `string.punctuation`, as in the official SQuAD/ReCoRD scripts), drop the whole words
/// a/an/the, and collapse runs of whitespace to one space (trimmed at both ends).
pub fn normalize(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fraction of predictions equal to their gold after [`normalize`].
pub fn accuracy<P: AsRef<str>, G: AsRef<str>>(preds: &[P], golds: &[G]) -> Result<f64> {
    check_lengths(preds.len(), golds.len())?;
    let right = preds
        .iter()
        .zip(golds)
        .filter(|(p, g)| normalize(p.as_ref()) == normalize(g.as_ref()))
        .count();
    Ok(right as f64 / preds.len() as f64)
}

/// Binary F1 of the class `positive`. A prediction that differs from its gold (including one that
/// is not a class at all) is taken as the opposite of the gold label: a false negative when the
/// gold is positive, a false positive otherwise. 0 when there is no true positive (scikit-learn's
/// value when precision or recall is undefined).
pub fn f1_binary<P: AsRef<str>, G: AsRef<str>>(
    preds: &[P],
    golds: &[G],
    positive: &str,
) -> Result<f64> {
    let c = Confusion::of(preds, golds, positive)?;
    Ok(f1_from_counts(c.tp, c.fp, c.fn_))
}

/// Macro F1: the mean over `classes` of each class's one-vs-rest F1. A prediction that is not one
/// of the classes is a false negative of the gold class and a false positive of nothing (no
/// phantom class enters the mean). Classes that occur neither in the golds nor in the predictions
/// are left out of the mean (their F1 is undefined; scikit-learn's default label set also omits
/// them), so a perfect prediction on a subset without some class still scores 1.
pub fn f1_macro<P: AsRef<str>, G: AsRef<str>, C: AsRef<str>>(
    preds: &[P],
    golds: &[G],
    classes: &[C],
) -> Result<f64> {
    check_lengths(preds.len(), golds.len())?;
    let mut norm_classes: Vec<String> = Vec::with_capacity(classes.len());
    for c in classes {
        let n = normalize(c.as_ref());
        // Two class texts that normalise alike would be counted twice.
        if !norm_classes.contains(&n) {
            norm_classes.push(n);
        }
    }
    let pairs: Vec<(String, String)> = preds
        .iter()
        .zip(golds)
        .map(|(p, g)| (normalize(p.as_ref()), normalize(g.as_ref())))
        .collect();
    let mut sum = 0.0;
    let mut counted = 0usize;
    for c in &norm_classes {
        let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
        for (p, g) in &pairs {
            match (p == c, g == c) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fn_ += 1,
                (false, false) => {}
            }
        }
        if tp + fp + fn_ > 0 {
            sum += f1_from_counts(tp, fp, fn_);
            counted += 1;
        }
    }
    // No class occurs at all: nothing was right.
    Ok(if counted == 0 {
        0.0
    } else {
        sum / counted as f64
    })
}

/// Binary Matthews correlation coefficient with `positive` as the positive class; unknown
/// predictions are the opposite of the gold label, as in [`f1_binary`]. 0 when the denominator is
/// 0 (a row or column of the confusion matrix is empty), as scikit-learn.
pub fn matthews<P: AsRef<str>, G: AsRef<str>>(
    preds: &[P],
    golds: &[G],
    positive: &str,
) -> Result<f64> {
    let c = Confusion::of(preds, golds, positive)?;
    // In f64: the product of four counts can overflow usize on large sets.
    let (tp, tn, fp, fn_) = (c.tp as f64, c.tn as f64, c.fp as f64, c.fn_ as f64);
    let denom = ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt();
    if denom == 0.0 {
        return Ok(0.0);
    }
    Ok(((tp * tn - fp * fn_) / denom).clamp(-1.0, 1.0))
}

/// Pearson correlation. A constant series (all values equal) has no defined correlation; it scores
/// 0 instead of NaN so a collapsed model reads as uncorrelated. Non-finite inputs are an error.
pub fn pearson(x: &[f64], y: &[f64]) -> Result<f64> {
    check_lengths(x.len(), y.len())?;
    check_finite(x, "x")?;
    check_finite(y, "y")?;
    // Test constancy exactly: the float mean of a constant series can leave tiny nonzero deviations.
    if x.iter().all(|v| *v == x[0]) || y.iter().all(|v| *v == y[0]) {
        return Ok(0.0);
    }
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let denom = (sxx * syy).sqrt();
    if denom == 0.0 {
        return Ok(0.0);
    }
    Ok((sxy / denom).clamp(-1.0, 1.0))
}

/// Spearman rank correlation: the [`pearson`] correlation of the ranks, tied values taking the
/// average of the ranks they span (as scipy). A constant series scores 0, as in [`pearson`].
pub fn spearman(x: &[f64], y: &[f64]) -> Result<f64> {
    check_lengths(x.len(), y.len())?;
    check_finite(x, "x")?;
    check_finite(y, "y")?;
    pearson(&ranks(x), &ranks(y))
}

/// SQuAD token F1 of one prediction against one answer, over the whitespace tokens of their
/// [`normalize`]d forms, counting repeated tokens at most as often as both sides have them.
/// Both empty after normalisation scores 1 (they match exactly, so F1 agrees with EM); one empty 0.
pub fn token_f1(pred: &str, gold: &str) -> f64 {
    let (p, g) = (normalize(pred), normalize(gold));
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return if pt.is_empty() && gt.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut gold_counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for t in &gt {
        *gold_counts.entry(t).or_insert(0) += 1;
    }
    let mut same = 0usize;
    for t in &pt {
        if let Some(c) = gold_counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// MultiRC: returns (F1a, EM). Each prediction is one answer option's label. F1a is the binary F1
/// of `positive` (see [`f1_binary`]) over all answer options pooled; EM is the fraction of question
/// groups (by `Gold::group`) whose options are all right. Every gold needs a group.
pub fn multirc<P: AsRef<str>>(
    preds: &[P],
    golds: &[Gold<'_>],
    positive: &str,
) -> Result<(f64, f64)> {
    check_lengths(preds.len(), golds.len())?;
    let targets: Vec<&str> = golds.iter().map(|g| g.target).collect();
    let f1a = f1_binary(preds, &targets, positive)?;
    let mut all_right: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    for (i, (p, g)) in preds.iter().zip(golds).enumerate() {
        let group = g.group.ok_or_else(|| {
            Error::Input(format!(
                "gold {i}: MultiRC answer option has no question group"
            ))
        })?;
        let right = normalize(p.as_ref()) == normalize(g.target);
        *all_right.entry(group).or_insert(true) &= right;
    }
    let em = all_right.values().filter(|r| **r).count() as f64 / all_right.len() as f64;
    Ok((f1a, em))
}

/// ReCoRD: returns (F1, EM). Per example each is the best over its acceptable answers
/// (`Gold::answers`, or `Gold::target` alone when that is empty) of [`token_f1`] and of exact
/// match after [`normalize`]; both are then averaged over the examples.
pub fn record<P: AsRef<str>>(preds: &[P], golds: &[Gold<'_>]) -> Result<(f64, f64)> {
    check_lengths(preds.len(), golds.len())?;
    let (mut f1_sum, mut em_sum) = (0.0, 0.0);
    for (p, g) in preds.iter().zip(golds) {
        let p = p.as_ref();
        let np = normalize(p);
        let answers: Vec<&str> = if g.answers.is_empty() {
            vec![g.target]
        } else {
            g.answers.iter().map(String::as_str).collect()
        };
        let f1 = answers.iter().map(|a| token_f1(p, a)).fold(0.0, f64::max);
        let em = if answers.iter().any(|a| normalize(a) == np) {
            1.0
        } else {
            0.0
        };
        f1_sum += f1;
        em_sum += em;
    }
    let n = preds.len() as f64;
    Ok((f1_sum / n, em_sum / n))
}

/// Predictions and golds must pair up one to one, and there must be something to score.
fn check_lengths(n_preds: usize, n_golds: usize) -> Result<()> {
    if n_preds != n_golds {
        return Err(Error::Input(format!(
            "{n_preds} predictions for {n_golds} golds: they must pair up one to one"
        )));
    }
    if n_preds == 0 {
        return Err(Error::Input(
            "0 predictions and 0 golds: a metric needs at least one example".into(),
        ));
    }
    Ok(())
}

fn check_finite(v: &[f64], which: &str) -> Result<()> {
    match v.iter().position(|a| !a.is_finite()) {
        Some(i) => Err(Error::Input(format!(
            "{which}[{i}] = {} is not a finite number",
            v[i]
        ))),
        None => Ok(()),
    }
}

/// The positive class of a binary metric: the second of exactly two classes.
fn binary_positive(metric: Metric, classes: &[String]) -> Result<&str> {
    match classes {
        [_, positive] => Ok(positive.as_str()),
        _ => Err(Error::Input(format!(
            "metric {} is binary and needs exactly 2 classes, got {}: {classes:?}",
            metric.name(),
            classes.len()
        ))),
    }
}

fn check_golds_in_classes(targets: &[&str], classes: &[String]) -> Result<()> {
    if classes.is_empty() {
        return Ok(());
    }
    let norm: Vec<String> = classes.iter().map(|c| normalize(c)).collect();
    for (i, t) in targets.iter().enumerate() {
        if !norm.contains(&normalize(t)) {
            return Err(Error::Input(format!(
                "gold {i}: target {t:?} is not one of the task's classes {classes:?}"
            )));
        }
    }
    Ok(())
}

/// Binary confusion counts where a wrong prediction is the opposite of its gold.
struct Confusion {
    tp: usize,
    tn: usize,
    fp: usize,
    fn_: usize,
}

impl Confusion {
    fn of<P: AsRef<str>, G: AsRef<str>>(preds: &[P], golds: &[G], positive: &str) -> Result<Self> {
        check_lengths(preds.len(), golds.len())?;
        let positive = normalize(positive);
        let mut c = Confusion {
            tp: 0,
            tn: 0,
            fp: 0,
            fn_: 0,
        };
        for (p, g) in preds.iter().zip(golds) {
            let g = normalize(g.as_ref());
            // Only right/wrong and the gold's side matter: this makes an unknown prediction the
            // opposite of the gold without needing to know the negative class's text.
            let right = normalize(p.as_ref()) == g;
            match (right, g == positive) {
                (true, true) => c.tp += 1,
                (true, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.fp += 1,
            }
        }
        Ok(c)
    }
}

fn f1_from_counts(tp: usize, fp: usize, fn_: usize) -> f64 {
    if tp == 0 {
        return 0.0;
    }
    2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
}

/// 1-based ranks, ties sharing the mean of the ranks they span.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) hold ranks i+1..=j+1; their mean is (i+j)/2 + 1.
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = r;
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    fn plain(target: &str) -> Gold<'_> {
        Gold {
            target,
            answers: &[],
            group: None,
        }
    }

    fn value(out: &[(String, f64)], name: &str) -> f64 {
        out.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {name} in {out:?}"))
    }

    #[test]
    fn normalize_drops_case_punctuation_articles_and_spaces() {
        assert_eq!(normalize("  The  Quick, brown FOX! "), "quick brown fox");
        assert_eq!(normalize("An apple a day"), "apple day");
        // Articles only as whole words.
        assert_eq!(normalize("Theater ANTHEM"), "theater anthem");
        assert_eq!(normalize("U.S.A."), "usa");
        assert_eq!(normalize("not_entailment"), "notentailment");
        assert_eq!(normalize("the"), "");
    }

    #[test]
    fn accuracy_compares_normalized_labels() {
        // Yes=yes right, no!=yes wrong, maybe right: 2/3.
        let a = accuracy(&["Yes", "no", "maybe."], &["yes", "yes", "maybe"]).unwrap();
        close(a, 2.0 / 3.0);
    }

    #[test]
    fn f1_binary_from_confusion_counts() {
        // (pred, gold): (1,1) tp, (1,0) fp, (0,1) fn, (1,1) tp, (0,0) tn
        // tp=2 fp=1 fn=1 -> F1 = 2*2/(2*2+1+1) = 4/6 = 0.6667.
        let f = f1_binary(&["1", "1", "0", "1", "0"], &["1", "0", "1", "1", "0"], "1").unwrap();
        close(f, 4.0 / 6.0);
        // No positive anywhere: tp=0 -> 0, not NaN.
        close(f1_binary(&["0", "0"], &["0", "0"], "1").unwrap(), 0.0);
    }

    #[test]
    fn unknown_prediction_is_opposite_of_gold_in_binary_metrics() {
        // "maybe" vs gold true -> fn; "maybe" vs gold false -> fp; true/true -> tp.
        // tp=1 fp=1 fn=1 -> F1 = 2/(2+1+1) = 0.5.
        let preds = ["maybe", "maybe", "true"];
        let golds = ["true", "false", "true"];
        close(f1_binary(&preds, &golds, "true").unwrap(), 0.5);
        // MCC: tp=1 tn=0 fp=1 fn=1 -> (1*0 - 1*1)/sqrt(2*2*1*1) = -1/2.
        close(matthews(&preds, &golds, "true").unwrap(), -0.5);
        // Through score, with classes: accuracy 1/3 (only the last is right).
        let classes = s(&["false", "true"]);
        let g: Vec<Gold> = golds.iter().map(|t| plain(t)).collect();
        let out = score(Metric::Accuracy, &s(&preds), &g, &classes).unwrap();
        close(value(&out, "accuracy"), 1.0 / 3.0);
    }

    #[test]
    fn matthews_hand_checked() {
        // Same pairs as the F1 test: tp=2 tn=1 fp=1 fn=1.
        // (2*1 - 1*1)/sqrt((2+1)(2+1)(1+1)(1+1)) = 1/sqrt(36) = 1/6.
        let m = matthews(&["1", "1", "0", "1", "0"], &["1", "0", "1", "1", "0"], "1").unwrap();
        close(m, 1.0 / 6.0);
        // Perfect 1, inverted -1.
        close(matthews(&["1", "0"], &["1", "0"], "1").unwrap(), 1.0);
        close(matthews(&["0", "1"], &["1", "0"], "1").unwrap(), -1.0);
    }

    #[test]
    fn matthews_zero_denominator_is_zero() {
        // All predicted positive: tp=2 fp=1 tn=0 fn=0 -> (tn+fn)=0 -> denominator 0 -> 0.
        close(
            matthews(&["1", "1", "1"], &["1", "0", "1"], "1").unwrap(),
            0.0,
        );
    }

    #[test]
    fn f1_macro_cb_with_a_class_never_predicted() {
        // golds: E E E C C N, preds: E E C C E E.
        // E: tp=2 fp=2 (i4,i5) fn=1 (i2) -> 4/7; C: tp=1 fp=1 (i2) fn=1 (i4) -> 2/4 = 1/2;
        // N: tp=0 fp=0 fn=1 -> 0. Macro = (4/7 + 1/2 + 0)/3 = (15/14)/3 = 5/14 = 0.3571.
        let classes = s(&["entailment", "contradiction", "neutral"]);
        let golds = [
            "entailment",
            "entailment",
            "entailment",
            "contradiction",
            "contradiction",
            "neutral",
        ];
        let preds = [
            "entailment",
            "entailment",
            "contradiction",
            "contradiction",
            "entailment",
            "entailment",
        ];
        close(f1_macro(&preds, &golds, &classes).unwrap(), 5.0 / 14.0);
        let g: Vec<Gold> = golds.iter().map(|t| plain(t)).collect();
        let out = score(Metric::F1Macro, &s(&preds), &g, &classes).unwrap();
        assert_eq!(out.len(), 1);
        close(value(&out, "f1_macro"), 5.0 / 14.0);
    }

    #[test]
    fn f1_macro_unknown_prediction_and_absent_class() {
        // yes/yes: yes tp=1 -> F1 1. "dunno" vs no: no fn=1 -> F1 0, and no phantom class.
        // "maybe" occurs nowhere -> left out. Macro = (1 + 0)/2 = 0.5.
        let f = f1_macro(&["yes", "dunno"], &["yes", "no"], &["yes", "no", "maybe"]).unwrap();
        close(f, 0.5);
        // Perfect on a subset lacking "maybe" scores 1.
        close(
            f1_macro(&["yes", "no"], &["yes", "no"], &["yes", "no", "maybe"]).unwrap(),
            1.0,
        );
    }

    #[test]
    fn pearson_hand_checked_perfect_inverted_constant() {
        // x=1 2 3 4, y=1 3 2 4: means 2.5; dx=-1.5 -.5 .5 1.5, dy=-1.5 .5 -.5 1.5;
        // sxy=2.25-.25-.25+2.25=4, sxx=syy=5 -> r = 4/5 = 0.8.
        close(
            pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap(),
            0.8,
        );
        close(pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap(), 1.0);
        close(pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap(), -1.0);
        // Constant series: 0, not NaN (also a single example).
        close(pearson(&[3.4, 3.4, 3.4], &[1.0, 2.0, 3.0]).unwrap(), 0.0);
        close(pearson(&[1.0], &[2.0]).unwrap(), 0.0);
        assert!(pearson(&[f64::NAN, 1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn spearman_with_ties_and_monotone_data() {
        // x=1 2 2 3 -> ranks 1 2.5 2.5 4; y=1 2 3 4 -> ranks 1 2 3 4. Means 2.5.
        // dx=-1.5 0 0 1.5, dy=-1.5 -.5 .5 1.5: sxy=4.5, sxx=4.5, syy=5
        // -> 4.5/sqrt(22.5) = sqrt(0.9) = 0.948683.
        close(
            spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap(),
            0.9f64.sqrt(),
        );
        // Monotone but not linear: spearman 1, pearson below 1.
        close(spearman(&[1.0, 2.0, 3.0], &[1.0, 4.0, 100.0]).unwrap(), 1.0);
        assert!(pearson(&[1.0, 2.0, 3.0], &[1.0, 4.0, 100.0]).unwrap() < 0.99);
        close(spearman(&[1.0, 2.0, 3.0], &[9.0, 5.0, 1.0]).unwrap(), -1.0);
        close(spearman(&[2.0, 2.0], &[1.0, 2.0]).unwrap(), 0.0);
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn stsb_unparsable_prediction_counts_as_zero() {
        // preds 5.0, "x"->0.0, 2.5; golds 4 1 2. x means 2.5, y mean 7/3.
        // dx=2.5 -2.5 0, dy=5/3 -4/3 -1/3: sxy=7.5, sxx=12.5, syy=42/9
        // -> pearson = 7.5/sqrt(12.5*42/9) = 0.981981. Ranks equal (3 1 2) -> spearman 1.
        let golds = [plain("4"), plain("1"), plain("2")];
        let out = score(
            Metric::PearsonSpearman,
            &s(&["5.0", "x", " 2.5 "]),
            &golds,
            &[],
        )
        .unwrap();
        assert_eq!(out[0].0, "pearson");
        assert_eq!(out[1].0, "spearman");
        close(out[0].1, 7.5 / (12.5f64 * 42.0 / 9.0).sqrt());
        close(out[1].1, 1.0);
        // A non-numeric gold is bad data: an error.
        let bad = [plain("4"), plain("high")];
        let err = score(Metric::PearsonSpearman, &s(&["1", "2"]), &bad, &[]).unwrap_err();
        assert!(err.to_string().contains("high"), "{err}");
    }

    #[test]
    fn token_f1_hand_checked() {
        // pred eiffel tower paris vs gold eiffel tower: same=2, p=2/3, r=1 -> 2*(2/3)/(5/3) = 0.8.
        close(token_f1("the Eiffel Tower, Paris", "Eiffel Tower"), 0.8);
        // Repeats count once per gold occurrence: new new york vs new york -> same=2 -> 0.8.
        close(token_f1("new new york", "new york"), 0.8);
        close(token_f1("London", "Paris"), 0.0);
        close(token_f1("The.", "a"), 1.0);
        close(token_f1("", "Paris"), 0.0);
    }

    #[test]
    fn multirc_two_questions_one_fully_right() {
        // q1: golds T F, preds T F -> tp, tn: all right.
        // q2: golds T T F, preds T F T -> tp, fn, fp: not all right.
        // Pooled tp=2 fp=1 fn=1 -> F1a = 4/6 = 0.6667; EM = 1/2.
        let classes = s(&["False", "True"]);
        let rows = [
            ("q1", "True", "True"),
            ("q2", "True", "True"),
            ("q1", "False", "False"),
            ("q2", "True", "False"),
            ("q2", "False", "True"),
        ];
        let golds: Vec<Gold> = rows
            .iter()
            .map(|(q, t, _)| Gold {
                target: t,
                answers: &[],
                group: Some(q),
            })
            .collect();
        let preds: Vec<String> = rows.iter().map(|(_, _, p)| p.to_string()).collect();
        let out = score(Metric::MultiRc, &preds, &golds, &classes).unwrap();
        assert_eq!(out[0].0, "f1a");
        assert_eq!(out[1].0, "em");
        close(out[0].1, 4.0 / 6.0);
        close(out[1].1, 0.5);
        // Without a group: an error naming the example.
        let ungrouped = [plain("True")];
        assert!(multirc(&["True"], &ungrouped, "True").is_err());
    }

    #[test]
    fn record_best_answer_with_punctuation_and_articles() {
        // ex1: "obama." = "Obama" after normalize -> F1 1, EM 1.
        // ex2: "United States of America" vs "the United States": tokens united states of america
        //      vs united states: same=2, p=2/4, r=1 -> 2*.5/1.5 = 2/3; vs "U.S." (us): 0. EM 0.
        // ex3: no answers list, target "The Beatles" vs "Beatles" -> F1 1, EM 1.
        // F1 = (1 + 2/3 + 1)/3 = 8/9 = 0.8889; EM = 2/3.
        let a1 = s(&["Barack Obama", "Obama"]);
        let a2 = s(&["the United States", "U.S."]);
        let golds = [
            Gold {
                target: "Barack Obama",
                answers: &a1,
                group: None,
            },
            Gold {
                target: "the United States",
                answers: &a2,
                group: None,
            },
            plain("The Beatles"),
        ];
        let preds = s(&["obama.", "United States of America", "Beatles"]);
        let out = score(Metric::Record, &preds, &golds, &[]).unwrap();
        assert_eq!(out[0].0, "f1");
        assert_eq!(out[1].0, "em");
        close(out[0].1, 8.0 / 9.0);
        close(out[1].1, 2.0 / 3.0);
    }

    #[test]
    fn score_names_for_binary_metrics() {
        let classes = s(&["0", "1"]);
        let golds = [plain("1"), plain("0")];
        let preds = s(&["1", "0"]);
        let f1 = score(Metric::F1, &preds, &golds, &classes).unwrap();
        assert_eq!(f1, vec![("f1".to_string(), 1.0)]);
        let m = score(Metric::Matthews, &preds, &golds, &classes).unwrap();
        assert_eq!(m, vec![("matthews".to_string(), 1.0)]);
    }

    #[test]
    fn length_mismatch_and_empty_input_are_errors() {
        let golds = [plain("1"), plain("0"), plain("1")];
        let err = score(Metric::Accuracy, &s(&["1", "0"]), &golds, &[]).unwrap_err();
        assert!(matches!(err, Error::Input(_)));
        let msg = err.to_string();
        assert!(msg.contains('2') && msg.contains('3'), "{msg}");
        let err = score(Metric::Accuracy, &[], &[], &[]).unwrap_err();
        assert!(matches!(err, Error::Input(_)));
        assert!(err.to_string().contains('0'), "{err}");
        assert!(accuracy::<&str, &str>(&[], &[]).is_err());
        assert!(pearson(&[1.0], &[1.0, 2.0]).is_err());
        assert!(record(&["a"], &[]).is_err());
    }

    #[test]
    fn bad_classes_are_errors() {
        let golds = [plain("1")];
        // Binary metric with three classes.
        assert!(score(Metric::F1, &s(&["1"]), &golds, &s(&["0", "1", "2"])).is_err());
        // Gold outside the label set.
        let err = score(Metric::Accuracy, &s(&["1"]), &golds, &s(&["no", "yes"])).unwrap_err();
        assert!(err.to_string().contains("\"1\""), "{err}");
        assert!(score(Metric::F1Macro, &s(&["1"]), &golds, &[]).is_err());
    }
}
