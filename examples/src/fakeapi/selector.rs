//! Label and field selectors as the API server parses them (`labelSelector=`,
//! `fieldSelector=` query parameters).

use std::collections::BTreeMap;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    /// `key=value` or `key==value`, and `key in (a,b)`.
    In(String, Vec<String>),
    /// `key!=value` and `key notin (a,b)`: also true when the label is absent.
    NotIn(String, Vec<String>),
    /// `key`: the label exists.
    Exists(String),
    /// `!key`: the label does not exist.
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<LabelRequirement>);

impl LabelSelector {
    /// Parses the selector syntax of `k8s.io/apimachinery/pkg/labels`: comma-separated
    /// requirements `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_outside_parens(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(requirements))
    }

    /// Whether an object with these labels is selected.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether the selector selects everything.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn split_outside_parens(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<LabelRequirement, String> {
    let bad = |why: &str| format!("unable to parse requirement: {part:?}: {why}");
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key).map_err(|e| bad(&e))?;
        return Ok(LabelRequirement::DoesNotExist(key.to_string()));
    }
    if let Some((key, value)) = part.split_once("!=") {
        let key = key.trim();
        check_key(key).map_err(|e| bad(&e))?;
        let value = value.trim();
        check_value(value).map_err(|e| bad(&e))?;
        return Ok(LabelRequirement::NotIn(
            key.to_string(),
            vec![value.to_string()],
        ));
    }
    if let Some((key, value)) = part.split_once('=') {
        let key = key.trim();
        check_key(key).map_err(|e| bad(&e))?;
        let value = value.strip_prefix('=').unwrap_or(value).trim();
        check_value(value).map_err(|e| bad(&e))?;
        return Ok(LabelRequirement::In(
            key.to_string(),
            vec![value.to_string()],
        ));
    }
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default().trim();
    check_key(key).map_err(|e| bad(&e))?;
    let Some(rest) = words.next().map(str::trim) else {
        return Ok(LabelRequirement::Exists(key.to_string()));
    };
    let (negated, list) = if let Some(list) = rest.strip_prefix("notin") {
        (true, list)
    } else if let Some(list) = rest.strip_prefix("in") {
        (false, list)
    } else {
        return Err(bad("expected one of in, notin, =, ==, !="));
    };
    let list = list.trim();
    let inner = list
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| bad("a set of values needs parentheses"))?;
    let mut values = Vec::new();
    for value in inner.split(',') {
        let value = value.trim();
        check_value(value).map_err(|e| bad(&e))?;
        values.push(value.to_string());
    }
    Ok(if negated {
        LabelRequirement::NotIn(key.to_string(), values)
    } else {
        LabelRequirement::In(key.to_string(), values)
    })
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of alphanumerics, `-`, `_` and `.`, beginning and ending alphanumeric.
fn check_key(key: &str) -> Result<(), String> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 {
                return Err(format!("prefix of key {key:?} must be a DNS subdomain"));
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("a key is required".to_string());
    }
    check_value(name)
}

/// A label value: empty, or at most 63 characters of alphanumerics, `-`, `_` and `.`,
/// beginning and ending alphanumeric.
fn check_value(value: &str) -> Result<(), String> {
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!("invalid label key or value {value:?}"))
    }
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`, comma-separated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses a field selector; `supported` names the fields the resource can be
    /// selected by (the API server answers 400 for any other).
    pub(crate) fn parse(text: &str, supported: &[&str]) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    /// Whether the object is selected; `value_of` reads a supported field.
    pub(crate) fn matches(
        &self,
        object: &Value,
        value_of: impl Fn(&Value, &str) -> String,
    ) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (value_of(object, field) == *value) == *equal)
    }

    /// Whether the selector selects everything.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kube_proxy_selector_excludes_other_proxies_and_headless() {
        // What kube-proxy sends for Services.
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[(
            "service.kubernetes.io/service-proxy-name",
            "x"
        )])));
        assert!(!s.matches(&labels(&[("service.kubernetes.io/headless", "")])));
    }

    #[test]
    fn equality_inequality_and_sets() {
        let s = LabelSelector::parse("tier in (web, api),env!=prod,app==shop,team").unwrap();
        assert!(s.matches(&labels(&[("tier", "api"), ("app", "shop"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("tier", "db"), ("app", "shop"), ("team", "a")])));
        assert!(!s.matches(&labels(&[
            ("tier", "web"),
            ("app", "shop"),
            ("team", "a"),
            ("env", "prod")
        ])));
        assert!(!s.matches(&labels(&[("tier", "web"), ("app", "shop")])));
        let n = LabelSelector::parse("env notin (prod)").unwrap();
        assert!(n.matches(&labels(&[])));
        assert!(!n.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn bad_selectors_are_errors() {
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(LabelSelector::parse("-bad=x").is_err());
        assert!(LabelSelector::parse("a within (b)").is_err());
        let err = FieldSelector::parse("spec.foo=bar", &["metadata.name"]).unwrap_err();
        assert_eq!(err, "field label not supported: spec.foo");
        assert!(FieldSelector::parse("metadata.name", &["metadata.name"]).is_err());
    }
}
