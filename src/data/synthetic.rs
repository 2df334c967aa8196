//! The built-in synthetic text-to-text task of the embedded default: no download, generated in
//! process from a seed.
//!
//! Each input is a run of random "filler" tokens with one keyword token hidden at a random
//! position; the target is one label word (positive or negative, depending on which keyword set
//! the keyword comes from) followed by EOS — a toy version of the papers' classification tasks
//! cast as text-to-text. A frozen random backbone with a trained prompt learns first to emit
//! label words at all (the loss falls from ln V towards ln 2 quickly), then, if it can, to read
//! the keyword.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Example;
use crate::error::{Error, Result};

/// Keyword ids of each class, and the label word of each class. Small ids: every vocabulary
/// of fastpt's shapes has them.
const POSITIVE_KEYWORDS: [i32; 3] = [10, 11, 12];
const NEGATIVE_KEYWORDS: [i32; 3] = [13, 14, 15];
const POSITIVE_LABEL: i32 = 20;
const NEGATIVE_LABEL: i32 = 21;
/// Filler tokens are drawn from here up to the vocabulary size.
const FIRST_FILLER: i32 = 30;

/// The most examples the synthetic task generates per split (each holds up to 32 ids and two
/// vectors, about 200 bytes: ten million take about 2 GB).
pub const MAX_EXAMPLES: usize = 10_000_000;

/// `n` examples of the keyword task for a vocabulary of `vocab` ids with EOS `eos`, inputs of
/// 6 to 30 tokens (EOS included). A vocabulary without room for the filler tokens, or `n`
/// above [`MAX_EXAMPLES`], is an error.
pub fn keyword_task(n: usize, vocab: usize, eos: i32, seed: u64) -> Result<Vec<Example>> {
    let vocab_ids = i32::try_from(vocab)
        .ok()
        .filter(|&v| v > FIRST_FILLER + 1)
        .ok_or_else(|| {
            Error::Input(format!(
                "the synthetic task needs a vocabulary of {} to {} ids; the model has {vocab}",
                FIRST_FILLER + 2,
                i32::MAX
            ))
        })?;
    if n > MAX_EXAMPLES {
        return Err(Error::Input(format!(
            "the synthetic task: {n} examples asked for (data.train_examples or \
             data.dev_examples), more than its limit of {MAX_EXAMPLES}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok((0..n)
        .map(|_| {
            let len = rng.random_range(5..30);
            let mut input: Vec<i32> = (0..len)
                .map(|_| rng.random_range(FIRST_FILLER..vocab_ids))
                .collect();
            let positive = rng.random_bool(0.5);
            let keywords = if positive {
                POSITIVE_KEYWORDS
            } else {
                NEGATIVE_KEYWORDS
            };
            input[rng.random_range(0..len)] = keywords[rng.random_range(0..keywords.len())];
            input.push(eos);
            let label = if positive {
                POSITIVE_LABEL
            } else {
                NEGATIVE_LABEL
            };
            Example {
                input,
                target: vec![label, eos],
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_has_one_keyword_and_the_matching_label() {
        let examples = keyword_task(200, 1000, 1, 7).unwrap();
        assert_eq!(examples, keyword_task(200, 1000, 1, 7).unwrap(), "seeded");
        let mut positives = 0;
        for ex in &examples {
            assert_eq!(*ex.input.last().unwrap(), 1);
            assert!((6..=30).contains(&ex.input.len()));
            let pos = ex
                .input
                .iter()
                .filter(|t| POSITIVE_KEYWORDS.contains(t))
                .count();
            let neg = ex
                .input
                .iter()
                .filter(|t| NEGATIVE_KEYWORDS.contains(t))
                .count();
            assert_eq!(pos + neg, 1);
            let want = if pos == 1 {
                POSITIVE_LABEL
            } else {
                NEGATIVE_LABEL
            };
            assert_eq!(ex.target, vec![want, 1]);
            positives += pos;
        }
        assert!(
            (70..130).contains(&positives),
            "classes are balanced: {positives}"
        );
    }

    #[test]
    fn small_vocabularies_and_huge_counts_are_errors() {
        for vocab in [0, 31, usize::MAX] {
            let e = keyword_task(3, vocab, 1, 0).unwrap_err().to_string();
            assert!(
                e.contains("vocabulary") && e.contains(&vocab.to_string()),
                "{e}"
            );
        }
        assert!(keyword_task(3, 32, 1, 0).is_ok());
        let e = keyword_task(MAX_EXAMPLES + 1, 100, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.train_examples"), "{e}");
    }
}
