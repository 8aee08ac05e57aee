//! Shortens an event's `data` until its frame fits the frame limit, keeping every key.
//!
//! Works on the JSON text itself, so everything that is not shortened (key order, numbers such
//! as `45.00`, nesting) stays byte for byte as rendered.

/// Why `data` could not be made to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event is larger than the frame limit even with every string and list emptied")]
pub(crate) struct TooLarge;

/// Passes over the text before giving up on shortening strings alone. Each pass removes at least
/// the excess it measured, so two passes suffice in practice; the bound only guarantees an end.
const MAX_PASSES: usize = 16;

/// Returns `data` shortened to at most `budget` bytes, or `None` when it already fits.
///
/// First the longest string values are cut to a common length (the strings, not the keys:
/// every key stays), at boundaries that keep the text valid JSON; a 700 KB order note becomes
/// the part of it that fits. Only if every string is empty and it still does not fit are list
/// elements dropped from the end of the longest lists.
pub fn shorten(data: &str, budget: usize) -> Result<Option<String>, TooLarge> {
    if data.len() <= budget {
        return Ok(None);
    }
    let mut text = data.to_owned();
    for _ in 0..MAX_PASSES {
        if text.len() <= budget {
            return Ok(Some(text));
        }
        let spans = value_strings(&text);
        let excess = text.len() - budget;
        let Some(cap) = common_cap(&spans, excess) else {
            break; // every string is already empty
        };
        let shorter = cut_strings(&text, &spans, cap);
        if shorter.len() >= text.len() {
            break;
        }
        text = shorter;
    }
    if text.len() <= budget {
        return Ok(Some(text));
    }
    drop_list_elements(&text, budget).map(Some)
}

/// Byte ranges of the contents (between the quotes) of every string that is a value, not a key.
fn value_strings(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut j = start;
        while j < bytes.len() && bytes[j] != b'"' {
            j += if bytes[j] == b'\\' { 2 } else { 1 };
        }
        let end = j.min(bytes.len());
        let mut k = end + 1;
        while k < bytes.len() && bytes[k].is_ascii_whitespace() {
            k += 1;
        }
        if bytes.get(k) != Some(&b':') {
            spans.push((start, end));
        }
        i = end + 1;
    }
    spans
}

/// The largest length `cap` such that cutting every string longer than `cap` down to it removes
/// at least `excess` bytes; `None` when the strings hold fewer bytes than that in all.
fn common_cap(spans: &[(usize, usize)], excess: usize) -> Option<usize> {
    let mut lengths: Vec<usize> = spans.iter().map(|(s, e)| e - s).collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    let total: usize = lengths.iter().sum();
    if total == 0 {
        return None;
    }
    if total < excess {
        return Some(0);
    }
    // Lower the cap through the sorted lengths: with the k longest strings cut to `cap`, the
    // bytes removed are sum(top k) - k * cap.
    let mut sum_top = 0usize;
    for (k, &len) in lengths.iter().enumerate() {
        sum_top += len;
        let next = lengths.get(k + 1).copied().unwrap_or(0);
        let count = k + 1;
        // Removed if the cap were `next`: sum_top - count * next.
        if sum_top - count * next >= excess {
            // The cap lies in [next, len]: the largest cap removing enough.
            let cap = (sum_top - excess) / count;
            return Some(cap.clamp(next, len));
        }
    }
    Some(0)
}

/// Copies `text` with each listed string cut to at most `cap` bytes of its content.
fn cut_strings(text: &str, spans: &[(usize, usize)], cap: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for &(start, end) in spans {
        if end - start <= cap {
            continue;
        }
        let keep = unit_boundary(&text[start..end], cap);
        out.push_str(&text[copied..start + keep]);
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// The longest prefix of a JSON string's content, at most `cap` bytes, that ends between two
/// whole characters: never inside a UTF-8 sequence, an escape, or a surrogate pair.
fn unit_boundary(content: &str, cap: usize) -> usize {
    let bytes = content.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let unit = if bytes[i] == b'\\' {
            match bytes.get(i + 1) {
                Some(b'u') => {
                    let high = content
                        .get(i + 2..i + 6)
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        .is_some_and(|c| (0xD800..0xDC00).contains(&c));
                    if high && content.get(i + 6..i + 8) == Some("\\u") {
                        12
                    } else {
                        6
                    }
                }
                _ => 2,
            }
        } else {
            content[i..].chars().next().map_or(1, char::len_utf8)
        };
        if i + unit > cap {
            break;
        }
        i += unit;
    }
    i.min(bytes.len())
}

/// Last resort for a value made of very many small parts: drops elements from the end of the
/// longest lists until the text fits.
fn drop_list_elements(text: &str, budget: usize) -> Result<String, TooLarge> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|_| TooLarge)?;
    loop {
        let rendered = value.to_string();
        if rendered.len() <= budget {
            return Ok(rendered);
        }
        let excess = rendered.len() - budget;
        let Some(list) = longest_list(&mut value) else {
            return Err(TooLarge);
        };
        // Drop about as many elements as the excess needs, at least one.
        let per_element = rendered.len() / list.len().max(1);
        let drop = (excess / per_element.max(1)).clamp(1, list.len());
        list.truncate(list.len() - drop);
    }
}

/// The non-empty list with the most elements, anywhere in the value.
fn longest_list(value: &mut serde_json::Value) -> Option<&mut Vec<serde_json::Value>> {
    /// A step down from a container: an index into a list or a key of an object.
    enum Step {
        Index(usize),
        Key(String),
    }
    fn find(v: &serde_json::Value, path: &mut Vec<Step>, best: &mut Option<(usize, Vec<Step>)>) {
        match v {
            serde_json::Value::Array(a) => {
                if !a.is_empty() && best.as_ref().is_none_or(|(n, _)| a.len() > *n) {
                    let copy = path
                        .iter()
                        .map(|s| match s {
                            Step::Index(i) => Step::Index(*i),
                            Step::Key(k) => Step::Key(k.clone()),
                        })
                        .collect();
                    *best = Some((a.len(), copy));
                }
                for (i, child) in a.iter().enumerate() {
                    path.push(Step::Index(i));
                    find(child, path, best);
                    path.pop();
                }
            }
            serde_json::Value::Object(o) => {
                for (k, child) in o {
                    path.push(Step::Key(k.clone()));
                    find(child, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut best = None;
    find(value, &mut Vec::new(), &mut best);
    let (_, path) = best?;
    let mut current = value;
    for step in path {
        current = match step {
            Step::Index(i) => current.get_mut(i)?,
            Step::Key(k) => current.get_mut(k.as_str())?,
        };
    }
    current.as_array_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_data_is_left_alone() {
        assert_eq!(shorten(r#"{"a":"xyz"}"#, 100), Ok(None));
    }

    #[test]
    fn the_longest_string_is_cut_and_every_key_kept() {
        let note = "n".repeat(10_000);
        let data = format!(
            r#"{{"orderId":"84df","totalAmount":45.00,"specialInstructions":"{note}","items":[{{"name":"Pizza","price":12.50}}]}}"#
        );
        let out = shorten(&data, 1_000).unwrap().unwrap();
        assert!(out.len() <= 1_000, "{}", out.len());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["orderId"], "84df");
        assert_eq!(v["items"][0]["name"], "Pizza");
        assert!(
            out.contains(r#""totalAmount":45.00"#),
            "numbers stay as written: {out}"
        );
        assert!(v["specialInstructions"].as_str().unwrap().len() > 800);
    }

    #[test]
    fn cuts_never_split_characters_escapes_or_surrogate_pairs() {
        for filler in ["é", "\\n", "\\u00e9", "\\ud83d\\ude00", "😀"] {
            let body = filler.repeat(3_000);
            let data = format!(r#"{{"a":"{body}","b":"{body}"}}"#);
            for budget in [100, 101, 102, 103, 107, 1_000] {
                let out = shorten(&data, budget).unwrap().unwrap();
                assert!(out.len() <= budget, "{filler} {budget}: {}", out.len());
                let v: serde_json::Value = serde_json::from_str(&out)
                    .unwrap_or_else(|e| panic!("{filler} {budget}: {e}: {out}"));
                assert!(v.get("a").is_some() && v.get("b").is_some());
            }
        }
    }

    #[test]
    fn several_long_strings_are_cut_to_a_common_length() {
        let data = format!(
            r#"{{"a":"{}","b":"{}","c":"short"}}"#,
            "x".repeat(5_000),
            "y".repeat(3_000)
        );
        let out = shorten(&data, 2_000).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let (a, b) = (v["a"].as_str().unwrap(), v["b"].as_str().unwrap());
        assert_eq!(a.len(), b.len(), "both cut to the same cap");
        assert_eq!(v["c"], "short");
        assert!(out.len() <= 2_000 && out.len() > 1_900, "{}", out.len());
    }

    #[test]
    fn many_small_parts_lose_list_elements_from_the_end() {
        let items: Vec<String> = (0..5_000).map(|i| format!(r#"{{"q":{i}}}"#)).collect();
        let data = format!(r#"{{"orderId":"x","items":[{}]}}"#, items.join(","));
        let out = shorten(&data, 10_000).unwrap().unwrap();
        assert!(out.len() <= 10_000);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["orderId"], "");
        let kept = v["items"].as_array().unwrap();
        assert!(!kept.is_empty() && kept.len() < 5_000);
        assert_eq!(kept[0]["q"], 0, "the first elements are kept");
    }

    #[test]
    fn an_object_of_keys_alone_cannot_be_made_to_fit() {
        let keys: Vec<String> = (0..1_000).map(|i| format!(r#""k{i}":1"#)).collect();
        let data = format!("{{{}}}", keys.join(","));
        assert_eq!(shorten(&data, 100), Err(TooLarge));
    }
}
