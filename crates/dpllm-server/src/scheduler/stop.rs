//! Stop strings over streamed text: text is released only once it can no
//! longer be the start of a stop string, so a stream never shows a stop
//! string (or its beginning) that the final answer does not contain.

/// Finds the first stop string in text that arrives in pieces.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released (may begin a stop string).
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (none: every piece is released at once).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// True once a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Add `piece`; returns the text that can be released now. After a stop
    /// string is found, the text before it is released and nothing more.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        let first = (self.stops.iter())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            self.held.truncate(at);
            return std::mem::take(&mut self.held);
        }
        // Keep the longest tail that is a proper prefix of a stop string.
        let keep = (self.stops.iter())
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// The text still held, released at the end of the answer (empty after a stop).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`
/// (ending on a character boundary of `text`).
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&k| {
            let start = text.len() - k;
            text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    /// Feed `pieces`; (released text, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p);
        }
        out += &m.finish();
        (out, m.stopped())
    }

    #[test]
    fn stops_split_across_pieces_are_found_and_never_released() {
        assert_eq!(run(&[], &["ab", "cd"]), ("abcd".into(), false));
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        // The earliest of several stops wins, wherever it arrives.
        assert_eq!(run(&["zz", "b"], &["a", "bzz"]), ("a".into(), true));
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        // Multi-byte text around a held prefix.
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn held_text_is_released_as_soon_as_it_cannot_start_a_stop() {
        let mut m = StopMatcher::new(vec!["###".into()]);
        assert_eq!(m.push("a#"), "a");
        assert_eq!(m.push("#"), "");
        assert_eq!(m.push("b"), "##b");
        assert_eq!(m.push("###c"), "");
        assert!(m.stopped());
        assert_eq!(m.push("more"), "");
    }
}
