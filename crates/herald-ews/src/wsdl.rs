//! The service description SOAP toolkits (zeep, PHP's SoapClient, .NET's proxy generators)
//! build their clients from: `Services.wsdl` for the operations Herald implements and the
//! schemas it imports, written for Herald in the EWS namespaces. They describe the XML this
//! crate reads and writes; a test keeps the two in step.

/// `messages.xsd` (the `m` namespace), served beside the WSDL.
pub const MESSAGES_XSD: &str = include_str!("../wsdl/messages.xsd");

/// `types.xsd` (the `t` namespace), imported by `messages.xsd`.
pub const TYPES_XSD: &str = include_str!("../wsdl/types.xsd");

const SERVICES_WSDL: &str = include_str!("../wsdl/Services.wsdl");

/// `Services.wsdl` with the service's address set to `endpoint` (the URL of
/// `Exchange.asmx` as the client reaches it), XML-escaped.
pub fn services_wsdl(endpoint: &str) -> String {
    let mut escaped = String::with_capacity(endpoint.len());
    for c in endpoint.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            c => escaped.push(c),
        }
    }
    SERVICES_WSDL.replace("{{EWS_URL}}", &escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_and_its_schemas_are_well_formed_and_the_address_is_set() {
        let wsdl = services_wsdl("http://h:1/EWS/Exchange.asmx?a=1&b=\"2\"");
        assert!(!wsdl.contains("{{EWS_URL}}"));
        assert!(wsdl.contains("location=\"http://h:1/EWS/Exchange.asmx?a=1&amp;b=&quot;2&quot;\""));
        for (name, text) in [
            ("wsdl", wsdl.as_str()),
            ("messages", MESSAGES_XSD),
            ("types", TYPES_XSD),
        ] {
            let root = crate::dom::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                !root.children.is_empty() || !root.text.is_empty(),
                "{name} is empty"
            );
        }
        // The namespaces clients send are http://, not the https:// some documentation spells.
        for text in [MESSAGES_XSD, TYPES_XSD] {
            assert!(text.contains(
                "targetNamespace=\"http://schemas.microsoft.com/exchange/services/2006/"
            ));
            assert!(!text.contains("https://schemas.microsoft.com"));
        }
    }
}
