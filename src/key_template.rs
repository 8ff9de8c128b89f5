//! Object key and partition key templates with Fluentd's placeholders.
//!
//! | placeholder          | becomes                                                        |
//! |----------------------|----------------------------------------------------------------|
//! | `${tag}`             | the chunk's tag                                                |
//! | `${tag[N]}`          | the N-th dot-separated part of the tag (negative counts from the end) |
//! | `${chunk_id}`        | the chunk id, 32 lowercase hex digits                          |
//! | `%{hostname}`        | this host's name                                               |
//! | `%{file_extension}`  | `msgpack.zst`, `json.gz`, … from format and compression        |
//! | `%Y %m %d %H %M %S`… | strftime of the chunk's timekey, in `--timekey-zone` (UTC)     |
//!
//! Placeholder values are never read as strftime, so a `%` in a tag stays a `%`. A `${tag[N]}`
//! outside the tag is left as written, as Fluentd does.

use chrono::format::{Item, StrftimeItems};

use crate::timekey::Zone;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Literal text, strftime applied.
    Text(String),
    Tag,
    TagIndex(i64),
    ChunkId,
    FileExtension,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    /// The zone strftime writes the timekey in.
    zone: Zone,
}

/// What a key is made from.
#[derive(Debug, Clone, Copy)]
pub struct KeyValues<'a> {
    pub tag: &'a str,
    pub chunk_id: &'a str,
    pub timekey: i64,
    pub file_extension: &'a str,
}

impl KeyTemplate {
    /// Parses `template`, substituting `%{hostname}` with `hostname` once.
    pub fn parse(template: &str, hostname: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while !rest.is_empty() {
            let (placeholder, len) = if let Some(inner) = rest.strip_prefix("${") {
                let end = inner
                    .find('}')
                    .ok_or_else(|| format!("unclosed placeholder in {template:?}"))?;
                let name = &inner[..end];
                let part = match name {
                    "tag" => Part::Tag,
                    "chunk_id" => Part::ChunkId,
                    _ => match name.strip_prefix("tag[").and_then(|n| n.strip_suffix(']')) {
                        Some(n) => Part::TagIndex(n.parse().map_err(|_| format!("bad tag index in ${{{name}}}"))?),
                        None => return Err(format!("unknown placeholder ${{{name}}} (known: ${{tag}}, ${{tag[N]}}, ${{chunk_id}})")),
                    },
                };
                (Some(part), end + 3)
            } else if let Some(after) = rest.strip_prefix("%{hostname}") {
                text.push_str(hostname);
                rest = after;
                continue;
            } else if rest.starts_with("%{file_extension}") {
                (Some(Part::FileExtension), "%{file_extension}".len())
            } else if rest.starts_with("%{") {
                let end = rest.find('}').unwrap_or(rest.len());
                return Err(format!(
                    "unknown placeholder {} (known: %{{hostname}}, %{{file_extension}})",
                    &rest[..=end.min(rest.len() - 1)]
                ));
            } else {
                let c = rest.chars().next().expect("rest is not empty");
                text.push(c);
                rest = &rest[c.len_utf8()..];
                continue;
            };
            if !text.is_empty() {
                parts.push(Part::Text(check_strftime(std::mem::take(&mut text))?));
            }
            parts.extend(placeholder);
            rest = &rest[len..];
        }
        if !text.is_empty() {
            parts.push(Part::Text(check_strftime(text)?));
        }
        Ok(KeyTemplate {
            parts,
            zone: Zone::UTC,
        })
    }

    /// What the template writes itself, its placeholders left out: its text, with
    /// `%{hostname}` and strftime applied (to a timekey of 0).
    pub fn literal_text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Text(t) => Some(self.zone.format(0, t)),
                _ => None,
            })
            .collect()
    }

    /// The template with its times written in `zone` (UTC unless set).
    pub fn in_zone(self, zone: Zone) -> Self {
        KeyTemplate { zone, ..self }
    }

    /// True if the template uses `${chunk_id}`.
    pub fn has_chunk_id(&self) -> bool {
        self.parts.contains(&Part::ChunkId)
    }

    pub fn render(&self, v: KeyValues<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(&self.zone.format(v.timekey, t)),
                Part::Tag => out.push_str(v.tag),
                Part::TagIndex(n) => {
                    let pieces: Vec<&str> = v.tag.split('.').collect();
                    let index = if *n < 0 { pieces.len() as i64 + n } else { *n };
                    match usize::try_from(index).ok().and_then(|i| pieces.get(i)) {
                        Some(p) => out.push_str(p),
                        None => out.push_str(&format!("${{tag[{n}]}}")),
                    }
                }
                Part::ChunkId => out.push_str(v.chunk_id),
                Part::FileExtension => out.push_str(v.file_extension),
            }
        }
        out
    }
}

fn check_strftime(text: String) -> Result<String, String> {
    if StrftimeItems::new(&text).any(|item| matches!(item, Item::Error)) {
        return Err(format!(
            "invalid strftime sequence in {text:?} (write %% for a literal %)"
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(tag: &str) -> KeyValues<'_> {
        KeyValues {
            tag,
            chunk_id: "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b",
            timekey: 1_763_740_800,
            file_extension: "msgpack.zst",
        }
    }

    #[test]
    fn default_template_renders_like_fluentd() {
        let t =
            KeyTemplate::parse("${tag}/%Y/%m/%d/%H/${chunk_id}.%{file_extension}", "host").unwrap();
        assert!(t.has_chunk_id());
        assert_eq!(
            t.render(values("app.web")),
            "app.web/2025/11/21/16/0193a1c2e4f87d3e9a5b6c7d8e9f0a1b.msgpack.zst"
        );
    }

    #[test]
    fn tag_parts_hostname_and_literal_percent() {
        let t = KeyTemplate::parse(
            "%{hostname}/${tag[0]}/${tag[-1]}/${tag[5]}/%%/%M-${chunk_id}",
            "ip-10-0-1-7",
        )
        .unwrap();
        assert_eq!(
            t.render(values("app.web.access")),
            "ip-10-0-1-7/app/access/${tag[5]}/%/00-0193a1c2e4f87d3e9a5b6c7d8e9f0a1b"
        );
        // A % inside a tag is not strftime.
        let t = KeyTemplate::parse("${tag}", "h").unwrap();
        assert_eq!(t.render(values("100%Y")), "100%Y");
        assert!(!t.has_chunk_id());
    }

    #[test]
    fn bad_templates_are_errors() {
        for bad in [
            "${nope}",
            "${tag",
            "%{uuid}",
            "x/%Q/${chunk_id}",
            "${tag[x]}",
        ] {
            assert!(KeyTemplate::parse(bad, "h").is_err(), "{bad}");
        }
    }
}
