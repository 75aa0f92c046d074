//! A small, namespace-resolved element tree for EWS requests, read safely: no DTD, no entity
//! other than XML's predefined ones and character references, bounded depth and size.

use quick_xml::NsReader;
use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};

use crate::{NS_MESSAGES, NS_SOAP, NS_TYPES};

/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 48;
/// Most elements accepted in one document.
pub const MAX_ELEMENTS: usize = 20_000;

/// The namespaces EWS uses, and any other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ns {
    /// SOAP 1.1 envelope.
    Soap,
    /// EWS messages (`m`).
    Messages,
    /// EWS types (`t`).
    Types,
    /// Another namespace.
    Other(String),
    /// No namespace.
    None,
}

/// One element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// Its namespace.
    pub ns: Ns,
    /// Its local name.
    pub name: String,
    /// Attributes by local name (namespace declarations left out).
    pub attrs: Vec<(String, String)>,
    /// Child elements in order.
    pub children: Vec<Element>,
    /// Its text content (concatenated, trimmed).
    pub text: String,
}

impl Element {
    /// The first child with this local name (any namespace: EWS clients disagree on `m`/`t`).
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child with this local name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// An attribute's value.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// Not well-formed XML.
    #[error("malformed XML at byte {position}: {message}")]
    Malformed {
        /// Where.
        position: u64,
        /// What the parser said.
        message: String,
    },
    /// A DOCTYPE: refused (no DTDs, no entity expansion).
    #[error("DTDs are not accepted")]
    Dtd,
    /// An entity reference other than XML's five and character references.
    #[error("entity &{0}; is not accepted")]
    Entity(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("nested deeper than {MAX_DEPTH} elements")]
    TooDeep,
    /// More than [`MAX_ELEMENTS`] elements.
    #[error("more than {MAX_ELEMENTS} elements")]
    TooLarge,
    /// A prefix that was never declared.
    #[error("undeclared namespace prefix {0:?}")]
    UnknownPrefix(String),
    /// No root element.
    #[error("the document has no root element")]
    Empty,
}

fn ns_of(r: &ResolveResult<'_>) -> Result<Ns, XmlError> {
    Ok(match r {
        ResolveResult::Bound(Namespace(uri)) => match &**uri {
            NS_SOAP => Ns::Soap,
            NS_MESSAGES => Ns::Messages,
            NS_TYPES => Ns::Types,
            u => Ns::Other(u.to_owned()),
        },
        ResolveResult::Unbound => Ns::None,
        ResolveResult::Unknown(p) => {
            return Err(XmlError::UnknownPrefix(p.to_string()));
        }
    })
}

fn element(
    position: u64,
    resolved: &ResolveResult<'_>,
    e: &quick_xml::events::BytesStart<'_>,
) -> Result<Element, XmlError> {
    let malformed = |err: &dyn std::fmt::Display| XmlError::Malformed {
        position,
        message: err.to_string(),
    };
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| malformed(&err))?;
        let key = a.key;
        let raw: &str = key.as_ref();
        if raw == "xmlns" || raw.starts_with("xmlns:") {
            continue;
        }
        let local: &str = key.local_name().into_inner();
        let local = local.to_owned();
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|err| malformed(&err))?
            .into_owned();
        attrs.push((local, value));
    }
    Ok(Element {
        ns: ns_of(resolved)?,
        name: e.local_name().into_inner().to_owned(),
        attrs,
        children: Vec::new(),
        text: String::new(),
    })
}

/// Reads `xml` into a tree.
pub fn parse(xml: &str) -> Result<Element, XmlError> {
    let mut reader = NsReader::from_str(xml);
    // Text is trimmed per element at the end, not per text event: `a &lt; b` keeps its spaces.
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let position = reader.buffer_position();
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|e| XmlError::Malformed {
                position,
                message: e.to_string(),
            })?;
        match event {
            Event::Start(_) | Event::Empty(_) if root.is_some() && stack.is_empty() => {
                return Err(XmlError::Malformed {
                    position,
                    message: "content after the root element".into(),
                });
            }
            Event::Start(e) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooLarge);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                let el = element(position, &resolved, &e)?;
                stack.push(el);
            }
            Event::Empty(e) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooLarge);
                }
                let el = element(position, &resolved, &e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let done = stack.pop().ok_or(XmlError::Malformed {
                    position,
                    message: "unbalanced end tag".into(),
                })?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => root = Some(done),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content());
                }
            }
            Event::CData(c) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&c.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                let ch = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .ok()
                        .flatten()
                        .ok_or_else(|| XmlError::Entity(r.as_ref().to_owned()))?
                } else {
                    let name: &str = r.as_ref();
                    match name {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "quot" => '"',
                        "apos" => '\'',
                        other => return Err(XmlError::Entity(other.to_owned())),
                    }
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push(ch);
                }
            }
            Event::DocType(_) => return Err(XmlError::Dtd),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Malformed {
            position: reader.buffer_position(),
            message: "the document ends inside an element".into(),
        });
    }
    let mut root = root.ok_or(XmlError::Empty)?;
    trim(&mut root);
    Ok(root)
}

fn trim(e: &mut Element) {
    let t = e.text.trim();
    if t.len() != e.text.len() {
        e.text = t.to_owned();
    }
    for c in &mut e.children {
        trim(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_namespaces_attributes_and_entities() {
        let doc = parse(&format!(
            r#"<?xml version="1.0"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:m="{NS_MESSAGES}"><s:Body><m:X a="1&amp;2">t &lt; &#65;<![CDATA[<c>]]></m:X></s:Body></s:Envelope>"#
        ))
        .unwrap();
        assert_eq!(doc.ns, Ns::Soap);
        let x = &doc.child("Body").unwrap().children[0];
        assert_eq!((x.ns.clone(), x.name.as_str()), (Ns::Messages, "X"));
        assert_eq!(x.attr("a"), Some("1&2"));
        assert_eq!(x.text, "t < A<c>");
    }

    #[test]
    fn refuses_dtds_entities_depth_and_garbage() {
        assert_eq!(
            parse(r#"<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>"#),
            Err(XmlError::Dtd)
        );
        assert!(matches!(parse("<x>&bogus;</x>"), Err(XmlError::Entity(_))));
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(XmlError::TooDeep));
        assert!(matches!(
            parse("<a><b></a>"),
            Err(XmlError::Malformed { .. })
        ));
        assert!(matches!(parse("<p:a/>"), Err(XmlError::UnknownPrefix(_))));
        assert_eq!(parse(""), Err(XmlError::Empty));
        assert!(matches!(parse("<a/><b/>"), Err(XmlError::Malformed { .. })));
        assert!(matches!(parse("<a>"), Err(XmlError::Malformed { .. })));
    }
}
