//! A small strict XML reader for S3's request bodies: it builds a tree of
//! elements with their text, bounded in size, depth and node count.
//!
//! S3 request bodies use a sliver of XML (elements, text, entities, an
//! optional declaration, comments); anything else, a `<!DOCTYPE>` above all
//! (entity expansion bombs), is refused as `MalformedXML` rather than handled.

use crate::error::{Code, S3Error};

/// Bounds on one document.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_bytes: usize,
    pub(crate) max_depth: usize,
    pub(crate) max_nodes: usize,
}

/// An element: its local name (any `prefix:` dropped), its children, and the
/// text directly inside it with entities resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    pub(crate) name: String,
    pub(crate) children: Vec<Element>,
    pub(crate) text: String,
}

impl Element {
    /// The text of a leaf element; an element with children has none.
    pub(crate) fn leaf_text(&self) -> Result<&str, S3Error> {
        if self.children.is_empty() {
            Ok(&self.text)
        } else {
            Err(malformed(format!("<{}> must hold text, not elements", self.name)))
        }
    }

    /// Whether the text around the children is only whitespace, as it must
    /// be in an element that holds elements.
    pub(crate) fn is_container(&self) -> bool {
        self.text.bytes().all(|b| b.is_ascii_whitespace())
    }
}

pub(crate) fn malformed(why: impl Into<String>) -> S3Error {
    let why = why.into();
    S3Error::new(
        Code::MalformedXML,
        format!("The XML you provided was not well-formed or did not validate against our published schema: {why}"),
    )
}

/// Parses one document into its root element.
pub(crate) fn parse(input: &[u8], limits: Limits) -> Result<Element, S3Error> {
    if input.len() > limits.max_bytes {
        return Err(malformed(format!("the body is over {} bytes", limits.max_bytes)));
    }
    let text = std::str::from_utf8(input).map_err(|_| malformed("the body is not UTF-8"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader {
        s: text.as_bytes(),
        src: text,
        pos: 0,
        nodes: 0,
        limits,
    };
    reader.skip_misc(true)?;
    if reader.pos >= reader.s.len() {
        return Err(malformed("the body holds no element"));
    }
    let root = reader.element(1)?;
    reader.skip_misc(false)?;
    if reader.pos != reader.s.len() {
        return Err(malformed("content after the root element"));
    }
    Ok(root)
}

struct Reader<'a> {
    s: &'a [u8],
    src: &'a str,
    pos: usize,
    nodes: usize,
    limits: Limits,
}

impl Reader<'_> {
    fn starts_with(&self, prefix: &str) -> bool {
        self.s[self.pos..].starts_with(prefix.as_bytes())
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && is_ws(self.s[self.pos]) {
            self.pos += 1;
        }
    }

    /// Skips whitespace, comments and processing instructions between
    /// top-level items; the XML declaration only where `prolog` allows it.
    fn skip_misc(&mut self, prolog: bool) -> Result<(), S3Error> {
        let mut first = prolog;
        loop {
            if first && self.starts_with("<?xml") {
                self.skip_past("?>")?;
            }
            first = false;
            self.skip_ws();
            if self.starts_with("<!--") {
                self.comment()?;
            } else if self.starts_with("<!") {
                return Err(malformed("DOCTYPE and other declarations are not accepted"));
            } else if self.starts_with("<?") {
                self.skip_past("?>")?;
            } else {
                return Ok(());
            }
        }
    }

    fn skip_past(&mut self, end: &str) -> Result<(), S3Error> {
        match find(&self.s[self.pos..], end.as_bytes()) {
            Some(at) => {
                self.pos += at + end.len();
                Ok(())
            }
            None => Err(malformed(format!("unterminated construct, '{end}' missing"))),
        }
    }

    fn comment(&mut self) -> Result<(), S3Error> {
        self.pos += 4;
        let at = find(&self.s[self.pos..], b"--").ok_or_else(|| malformed("unterminated comment"))?;
        self.pos += at;
        if !self.starts_with("-->") {
            return Err(malformed("'--' inside a comment"));
        }
        self.pos += 3;
        Ok(())
    }

    fn name(&mut self) -> Result<&str, S3Error> {
        let start = self.pos;
        while self.pos < self.s.len() {
            let b = self.s[self.pos];
            if is_ws(b) || matches!(b, b'>' | b'/' | b'=' | b'<' | b'"' | b'\'' | b'&') {
                break;
            }
            self.pos += 1;
        }
        if start == self.pos {
            return Err(malformed("an element or attribute without a name"));
        }
        let name = &self.src[start..self.pos];
        let first = name.as_bytes()[0];
        if first.is_ascii_digit() || matches!(first, b'-' | b'.') {
            return Err(malformed(format!("bad name '{name}'")));
        }
        Ok(name)
    }

    fn element(&mut self, depth: usize) -> Result<Element, S3Error> {
        if depth > self.limits.max_depth {
            return Err(malformed(format!(
                "elements nested over {} deep",
                self.limits.max_depth
            )));
        }
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(malformed(format!("over {} elements", self.limits.max_nodes)));
        }
        if !self.starts_with("<") {
            return Err(malformed("an element was expected"));
        }
        self.pos += 1;
        let qname = self.name()?.to_owned();
        // Attributes (namespace declarations in practice) are checked for
        // form and otherwise ignored.
        loop {
            let before = self.pos;
            self.skip_ws();
            if self.starts_with("/>") {
                self.pos += 2;
                return Ok(Element {
                    name: local(&qname),
                    children: Vec::new(),
                    text: String::new(),
                });
            }
            if self.starts_with(">") {
                self.pos += 1;
                break;
            }
            if before == self.pos {
                return Err(malformed(format!("bad attribute syntax in <{qname}>")));
            }
            self.name()?;
            self.skip_ws();
            if !self.starts_with("=") {
                return Err(malformed(format!("attribute without a value in <{qname}>")));
            }
            self.pos += 1;
            self.skip_ws();
            let quote = *self
                .s
                .get(self.pos)
                .ok_or_else(|| malformed("unterminated start tag"))?;
            if quote != b'"' && quote != b'\'' {
                return Err(malformed(format!("unquoted attribute value in <{qname}>")));
            }
            self.pos += 1;
            let end = self.s[self.pos..]
                .iter()
                .position(|&b| b == quote)
                .ok_or_else(|| malformed("unterminated attribute value"))?;
            let value = &self.src[self.pos..self.pos + end];
            if value.contains('<') {
                return Err(malformed("'<' in an attribute value"));
            }
            decode_entities(value, &mut String::new())?;
            self.pos += end + 1;
        }
        let mut element = Element {
            name: local(&qname),
            children: Vec::new(),
            text: String::new(),
        };
        loop {
            if self.pos >= self.s.len() {
                return Err(malformed(format!("<{qname}> is not closed")));
            }
            if self.starts_with("</") {
                self.pos += 2;
                let end = self.name()?;
                if end != qname {
                    return Err(malformed(format!("<{qname}> closed by </{end}>")));
                }
                self.skip_ws();
                if !self.starts_with(">") {
                    return Err(malformed(format!("bad end tag </{qname}")));
                }
                self.pos += 1;
                return Ok(element);
            } else if self.starts_with("<!--") {
                self.comment()?;
            } else if self.starts_with("<![CDATA[") {
                self.pos += 9;
                let at = find(&self.s[self.pos..], b"]]>").ok_or_else(|| malformed("unterminated CDATA"))?;
                element.text.push_str(&self.src[self.pos..self.pos + at]);
                self.pos += at + 3;
            } else if self.starts_with("<!") {
                return Err(malformed("declarations are not accepted inside elements"));
            } else if self.starts_with("<?") {
                self.skip_past("?>")?;
            } else if self.starts_with("<") {
                let child = self.element(depth + 1)?;
                element.children.push(child);
            } else {
                let end = self.s[self.pos..]
                    .iter()
                    .position(|&b| b == b'<')
                    .map_or(self.s.len(), |at| self.pos + at);
                let raw = &self.src[self.pos..end];
                if raw.contains("]]>") {
                    return Err(malformed("']]>' in text"));
                }
                decode_entities(raw, &mut element.text)?;
                self.pos = end;
            }
        }
    }
}

fn local(qname: &str) -> String {
    qname.rsplit(':').next().unwrap_or(qname).to_owned()
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Appends `raw` to `out` with the five predefined entities and character
/// references resolved; any other `&` is malformed.
fn decode_entities(raw: &str, out: &mut String) -> Result<(), S3Error> {
    let mut rest = raw;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let end = rest
            .find(';')
            .filter(|&e| e <= 10)
            .ok_or_else(|| malformed("an unterminated entity"))?;
        let entity = &rest[..end];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    None
                };
                // Digits only: from_str_radix and parse accept a sign.
                let digits_only = entity.bytes().skip(1).all(|b| b.is_ascii_alphanumeric());
                match code.filter(|_| digits_only).and_then(char::from_u32) {
                    Some(c) if c != '\0' => c,
                    _ => return Err(malformed(format!("unknown entity '&{entity};'"))),
                }
            }
        };
        out.push(c);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 4096,
        max_depth: 4,
        max_nodes: 16,
    };

    fn ok(doc: &str) -> Element {
        parse(doc.as_bytes(), LIMITS).unwrap()
    }

    fn bad(doc: &str) -> S3Error {
        let err = parse(doc.as_bytes(), LIMITS).unwrap_err();
        assert_eq!(err.code, Code::MalformedXML, "{doc}");
        err
    }

    #[test]
    fn reads_a_tree_with_entities_cdata_and_namespaces() {
        let root = ok(concat!(
            "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- c -->",
            "<s3:Delete xmlns:s3=\"http://s3.amazonaws.com/doc/2006-03-01/\" a='1'>",
            "<Object><Key>a&amp;b&lt;&#65;&#x42;<![CDATA[<x>]]></Key></Object>",
            "<Quiet>true</Quiet><Empty/></s3:Delete>\n"
        ));
        assert_eq!(root.name, "Delete");
        assert_eq!(root.children.len(), 3);
        assert_eq!(root.children[0].children[0].leaf_text().unwrap(), "a&b<AB<x>");
        assert_eq!(root.children[1].text, "true");
        assert_eq!(root.children[2].name, "Empty");
        assert!(root.is_container());
        assert!(root.leaf_text().is_err());
    }

    #[test]
    fn refuses_what_is_not_well_formed() {
        for doc in [
            "",
            "   ",
            "<a>",
            "<a></b>",
            "<a>x</a><b/>",
            "<a>&bogus;</a>",
            "<a>&#0;</a>",
            "<a>&#xD800;</a>",
            "<a>&#-5;</a>",
            "<a>& b</a>",
            "<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
            "<a><!ENTITY x \"y\"></a>",
            "<a b></a>",
            "<a b=c></a>",
            "<a b=\"<\"></a>",
            "<a><!-- x -- y --></a>",
            "<a>]]></a>",
            "<1a/>",
            "<a/>trailing",
        ] {
            bad(doc);
        }
        assert!(parse(b"<a>\xff</a>", LIMITS).is_err());
    }

    #[test]
    fn limits_hold() {
        let deep = "<a><a><a><a><a></a></a></a></a></a>";
        assert!(bad(deep).message.contains("deep"));
        let wide = format!("<a>{}</a>", "<b/>".repeat(16));
        assert!(bad(&wide).message.contains("elements"));
        let big = format!("<a>{}</a>", "x".repeat(5000));
        assert!(bad(&big).message.contains("bytes"));
        ok("<a><a><a><a></a></a></a></a>");
    }
}
