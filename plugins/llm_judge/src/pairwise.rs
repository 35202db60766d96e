//! Pairwise judging (`pairwise = { against = ... }`): the judge model compares each candidate's
//! answer with another's — a baseline candidate's, or the sample's reference answer — instead of
//! grading it alone. Each pair is judged twice, the answers in both orders, since judges favour a
//! position (MT-Bench's finding; Together's compare runs both orders by default): a candidate
//! wins a sample only when both orders say so, a verdict that changes with the order is a tie,
//! counted apart as inconsistent. Win rate = (wins + ties / 2) / judged samples, with a bootstrap
//! interval over samples.

use serde::Deserialize;
use serde_json::{Value, json};

use super::Rubric;
use artifacts::Message;

/// Which answer a judge said is better, as it saw them (first shown is `A`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    A,
    B,
    Tie,
}

impl Better {
    pub fn as_str(self) -> &'static str {
        match self {
            Better::A => "A",
            Better::B => "B",
            Better::Tie => "tie",
        }
    }
}

/// A candidate's result on one sample against the other answer, from both orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Win,
    Loss,
    /// The judge found them equal in both orders, or the answers are the same text.
    Tie,
    /// The verdict changed with the order (position bias): a tie, counted apart.
    Inconsistent,
    /// A reply could not be read.
    Unscored,
}

/// The outcome for the candidate from the verdict with its answer shown first (`first`) and
/// the verdict with its answer shown second (`second`).
pub fn combine(first: Option<Better>, second: Option<Better>) -> Outcome {
    let as_candidate = |b: Better, shown_first: bool| match (b, shown_first) {
        (Better::Tie, _) => Outcome::Tie,
        (Better::A, true) | (Better::B, false) => Outcome::Win,
        _ => Outcome::Loss,
    };
    match (first, second) {
        (Some(f), Some(s)) => {
            let (f, s) = (as_candidate(f, true), as_candidate(s, false));
            if f == s { f } else { Outcome::Inconsistent }
        }
        _ => Outcome::Unscored,
    }
}

/// The JSON Schema a pairwise verdict is constrained to (reasoning first, as in a grade).
pub fn schema(rubric: &Rubric) -> Value {
    json!({
        "type": "object",
        "properties": {
            "reasoning": {"type": "string", "maxLength": rubric.max_reasoning_chars},
            "better": {"type": "string", "enum": ["A", "B", "tie"]},
        },
        "required": ["reasoning", "better"],
        "additionalProperties": false,
    })
}

fn system_message(rubric: &Rubric) -> String {
    let mut s = format!("You compare two answers. {}\n\nA good answer:\n", rubric.task.trim());
    for p in &rubric.pass {
        s.push_str(&format!("- {p}\n"));
    }
    if !rubric.fail.is_empty() {
        s.push_str("\nA bad answer:\n");
        for f in &rubric.fail {
            s.push_str(&format!("- {f}\n"));
        }
    }
    s.push_str(
        "\nJudge which answer is better by these conditions only, not by which comes first or which is longer. Reply with JSON only: {\"reasoning\": \"<one short sentence>\", \"better\": \"A\", \"B\" or \"tie\"}.",
    );
    s
}

/// The judge's conversation for one pair in one order: the rubric as comparison criteria, and
/// the rubric's template rendered with the two answers, `A` then `B`, in place of one.
pub fn messages(rubric: &Rubric, input: &serde_json::Map<String, Value>, reference: Option<&str>, a: &str, b: &str) -> Result<Vec<Message>, minijinja::Error> {
    let both = format!("[Answer A]\n{}\n\n[Answer B]\n{}", a.trim(), b.trim());
    Ok(vec![Message::new("system", system_message(rubric)), Message::new("user", rubric.user_message(input, reference, &both)?)])
}

/// A pairwise reply read, or `None` when it is not one.
pub fn read(text: &str) -> Option<Better> {
    #[derive(Deserialize)]
    struct Reply {
        better: String,
    }
    let body = text.trim().trim_start_matches("```json").trim_start_matches("```").trim_end_matches("```").trim();
    match serde_json::from_str::<Reply>(body).ok()?.better.as_str() {
        "A" => Some(Better::A),
        "B" => Some(Better::B),
        "tie" => Some(Better::Tie),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_win_must_hold_in_both_orders() {
        use Better::*;
        // The candidate is A in the first order and B in the second.
        assert_eq!(combine(Some(A), Some(B)), Outcome::Win);
        assert_eq!(combine(Some(B), Some(A)), Outcome::Loss);
        assert_eq!(combine(Some(Tie), Some(Tie)), Outcome::Tie);
        // Position bias: the first-shown answer wins both times.
        assert_eq!(combine(Some(A), Some(A)), Outcome::Inconsistent);
        assert_eq!(combine(Some(B), Some(B)), Outcome::Inconsistent);
        assert_eq!(combine(Some(A), Some(Tie)), Outcome::Inconsistent);
        assert_eq!(combine(None, Some(B)), Outcome::Unscored);
        assert_eq!(read("{\"reasoning\": \"x\", \"better\": \"B\"}"), Some(B));
        assert_eq!(read("```json\n{\"better\": \"tie\"}\n```"), Some(Tie));
        assert_eq!(read("{\"better\": \"C\"}"), None);
        assert_eq!(read("A is better"), None);
    }
}
