//! `.json` manifests, read as kubectl reads them: one object, a `kind: List`, or a stream
//! of concatenated objects (kubectl's YAML-or-JSON decoder reads JSON as a stream of
//! values). Syntax errors carry serde_json's line; validation errors point at the field's
//! line, found by a small scanner over the object's text ([`locate`]).
//!
//! Role in the loader: only the reading of the text differs from YAML. Each object becomes
//! a [`Document`] holding its own JSON text, and goes through the same checks and
//! converters as a YAML document.

use std::ops::Range;

use serde::de::{DeserializeOwned, IgnoredAny};

use super::{
    ClusterConfig, Ctx, Document, LoadError, Manifests, Seg, ValidateError, api_path,
    load_document, path_segments, strict,
};

/// Reads a `.json` file's objects into `m`. A syntax error ends the file (a JSON stream
/// cannot be resynchronised); the objects before it still load.
pub(super) fn add_file(m: &mut Manifests, file: &str, text: &str, config: &ClusterConfig) {
    let (docs, error) = documents(text);
    for doc in &docs {
        load_document(m, file, doc, config);
    }
    if let Some((line, message)) = error {
        m.errors.push(LoadError {
            file: file.to_string(),
            line,
            document: docs.len(),
            object: None,
            field: String::new(),
            error: ValidateError::Json(message),
        });
    }
}

/// Splits a stream of JSON values into documents (each value's text and first line), and
/// the line and message of the syntax error that ended it, if any.
pub(super) fn documents(text: &str) -> (Vec<Document>, Option<(usize, String)>) {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
    // Byte offset where the previous value ended, and the line there.
    let mut end = 0;
    let mut line = 1;
    while let Some(next) = stream.next() {
        if let Err(e) = next {
            return (docs, Some((e.line().max(1), message(&e))));
        }
        let stop = stream.byte_offset();
        let between = text.get(end..stop).unwrap_or("");
        let start = end + (between.len() - between.trim_start().len());
        line += newlines(text.get(end..start).unwrap_or(""));
        let value = text.get(start..stop).unwrap_or("");
        docs.push(Document {
            index: docs.len(),
            line,
            text: value.to_string(),
        });
        line += newlines(value);
        end = stop;
    }
    (docs, None)
}

/// Parses one object's text into the loader's generic value; a syntax error (or a key
/// given twice) comes back with its 0-based line within the text.
pub(super) fn parse_value(text: &str) -> Result<serde_yaml_ng::Value, (usize, String)> {
    serde_json::from_str(text).map_err(|e| (e.line().saturating_sub(1), message(&e)))
}

/// Decodes an object as the API type `T` with strict field validation, as
/// [`super::decode`] does for YAML. serde_json's messages carry no field path; the field
/// is the innermost one holding the error's position.
pub(super) fn decode<T: DeserializeOwned>(text: &str, ctx: &Ctx<'_>) -> Result<T, Box<LoadError>> {
    let mut unknown = Vec::new();
    let de = &mut serde_json::Deserializer::from_str(text);
    let decoded = serde_ignored::deserialize(de, |path| unknown.push(api_path(&path)));
    let value = decoded.map_err(|e| {
        let rel = e.line().saturating_sub(1);
        let field = offset_of(text, e.line(), e.column())
            .map(|at| path_at(text, at))
            .unwrap_or_default();
        Box::new(LoadError {
            file: ctx.file.to_string(),
            line: ctx.doc.line + rel,
            document: ctx.doc.index,
            object: Some(ctx.object.clone()),
            field,
            error: ValidateError::Decode(message(&e)),
        })
    })?;
    strict(unknown, ctx)?;
    Ok(value)
}

/// serde_json's message without its " at line N column M" (the line is reported apart).
fn message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn newlines(s: &str) -> usize {
    s.bytes().filter(|b| *b == b'\n').count()
}

/// The 0-based line of a field path such as `spec.ports[1].nodePort` in one JSON object's
/// text; like [`super::locate_field`], the deepest line found when the path goes on past
/// what the text holds.
pub(super) fn locate(text: &str, path: &str) -> Option<usize> {
    let (found, _) = walk(text, path)?;
    Some(newlines(text.get(..found.start).unwrap_or("")))
}

/// The byte range of the value at a field path, when the whole path is found.
pub(super) fn span(text: &str, path: &str) -> Option<Range<usize>> {
    match walk(text, path)? {
        (found, true) => Some(found),
        (_, false) => None,
    }
}

/// Follows `path` from the root value: the range of the deepest value reached, and
/// whether that is the whole path.
fn walk(text: &str, path: &str) -> Option<(Range<usize>, bool)> {
    let b = text.as_bytes();
    let segs = path_segments(path)?;
    let root = skip_ws(b, 0);
    let mut cur = root..skip_value(b, root)?;
    for seg in segs {
        let next = match seg {
            Seg::Key(k) => members(b, cur.start)
                .into_iter()
                .find(|(key, _)| key.as_deref() == Some(k))
                .map(|(_, v)| v),
            Seg::Index(n) => items(b, cur.start).into_iter().nth(n),
        };
        match next {
            Some(v) => cur = v,
            None => return Some((cur, false)),
        }
    }
    Some((cur, true))
}

/// The field path of the innermost value holding byte `at` (where serde_json stopped).
fn path_at(text: &str, at: usize) -> String {
    let b = text.as_bytes();
    let root = skip_ws(b, 0);
    let mut path = String::new();
    let mut cur = root;
    // A value ends where serde_json reports an error about it, so ends are inclusive.
    let holds = |v: &Range<usize>| v.start <= at && at <= v.end;
    loop {
        let next = match b.get(cur) {
            Some(b'{') => members(b, cur)
                .into_iter()
                .find(|(_, v)| holds(v))
                .map(|(k, v)| {
                    let k = k.unwrap_or_default();
                    (if path.is_empty() { k } else { format!(".{k}") }, v)
                }),
            Some(b'[') => items(b, cur)
                .into_iter()
                .enumerate()
                .find(|(_, v)| holds(v))
                .map(|(i, v)| (format!("[{i}]"), v)),
            _ => None,
        };
        match next {
            Some((seg, v)) => {
                path.push_str(&seg);
                cur = v.start;
            }
            None => return path,
        }
    }
}

/// Byte offset of serde_json's (1-based line, 1-based byte column), one before the column:
/// the last byte it read.
fn offset_of(text: &str, line: usize, column: usize) -> Option<usize> {
    let line_start = if line <= 1 {
        0
    } else {
        text.match_indices('\n').nth(line - 2)?.0 + 1
    };
    Some(line_start + column.saturating_sub(1))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// The end of the string starting at `i` (its opening quote), past the closing quote.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match b.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The end of the value starting at `i`. Iterative, so no input nests it into a stack
/// overflow.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !c.is_ascii_whitespace() && !b",]}".contains(c))
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// The members of the object starting at `i`: each key (`None` when it is not a valid
/// string) and its value's range. Stops at the first malformed member.
fn members(b: &[u8], i: usize) -> Vec<(Option<String>, Range<usize>)> {
    let mut out = Vec::new();
    if b.get(i) != Some(&b'{') {
        return out;
    }
    let mut j = skip_ws(b, i + 1);
    while b.get(j) == Some(&b'"') {
        let Some(key_end) = skip_string(b, j) else {
            break;
        };
        let key = b
            .get(j..key_end)
            .and_then(|k| serde_json::from_slice::<String>(k).ok());
        j = skip_ws(b, key_end);
        if b.get(j) != Some(&b':') {
            break;
        }
        let start = skip_ws(b, j + 1);
        let Some(end) = skip_value(b, start) else {
            break;
        };
        out.push((key, start..end));
        j = skip_ws(b, end);
        if b.get(j) != Some(&b',') {
            break;
        }
        j = skip_ws(b, j + 1);
    }
    out
}

/// The items of the array starting at `i`, as value ranges.
fn items(b: &[u8], i: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    if b.get(i) != Some(&b'[') {
        return out;
    }
    let mut j = skip_ws(b, i + 1);
    while b.get(j).is_some_and(|c| *c != b']') {
        let Some(end) = skip_value(b, j) else {
            break;
        };
        out.push(j..end);
        j = skip_ws(b, end);
        if b.get(j) != Some(&b',') {
            break;
        }
        j = skip_ws(b, j + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = r#"{
  "apiVersion": "v1",
  "kind": "Service",
  "metadata": {"name": "web", "labels": {"a/b": "x"}},
  "spec": {
    "ports": [
      {"port": 80},
      {
        "name": "b",
        "port": 81,
        "nodePort": 5
      }
    ],
    "selector": {"app": "web"}
  }
}"#;

    #[test]
    fn locates_fields_and_spans() {
        assert_eq!(locate(SVC, "spec.ports[1].nodePort"), Some(10));
        assert_eq!(locate(SVC, "spec.ports[0].port"), Some(6));
        assert_eq!(locate(SVC, "spec.selector.app"), Some(13));
        assert_eq!(locate(SVC, "metadata.labels.a/b"), Some(3));
        // Past what the text holds: the deepest line found.
        assert_eq!(locate(SVC, "spec.ports[1].targetPort"), Some(7));
        assert_eq!(locate(SVC, "spec.ports[7]"), Some(5));
        let r = span(SVC, "apiVersion").expect("apiVersion");
        assert_eq!(&SVC[r], "\"v1\"");
        let r = span(SVC, "spec.ports[1]").expect("item");
        assert!(SVC[r].starts_with("{\n        \"name\": \"b\""));
        assert_eq!(span(SVC, "spec.ports[2]"), None);
    }

    #[test]
    fn finds_the_path_at_an_error_position() {
        let at = SVC.find("81").expect("81");
        assert_eq!(path_at(SVC, at + 1), "spec.ports[1].port");
        let at = SVC.find("\"x\"").expect("x");
        assert_eq!(path_at(SVC, at), "metadata.labels.a/b");
        assert_eq!(path_at(SVC, 0), "");
    }

    #[test]
    fn splits_a_stream_with_lines() {
        let text = "\n  {\"a\": 1}{\"b\":\n 2}\n\n[3]\n {";
        let (docs, err) = documents(text);
        let got: Vec<_> = docs
            .iter()
            .map(|d| (d.index, d.line, d.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [(0, 2, "{\"a\": 1}"), (1, 2, "{\"b\":\n 2}"), (2, 5, "[3]")]
        );
        assert_eq!(err, Some((6, "EOF while parsing an object".to_string())));
    }

    #[test]
    fn scanner_survives_malformed_and_deep_text() {
        let deep = "[".repeat(100_000);
        assert_eq!(locate(&deep, "a"), None);
        assert_eq!(path_at(&deep, 50_000), "");
        for text in [
            "{\"a\"",
            "{\"a\": ",
            "{\"a\": \"\\",
            "{\"a\" 1}",
            "[1,",
            "\"",
            "",
        ] {
            let _ = locate(text, "a[0].b");
            let _ = path_at(text, 3);
        }
    }
}
