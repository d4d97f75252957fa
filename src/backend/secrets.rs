//! The `secrets` of a CSI call: credentials that must never reach a log,
//! an event or an error message. Only their keys are ever printed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Secret values for one CSI call, as CSI carries them: text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

/// CSI's `secrets` are `map<string, string>` and protobuf strings are
/// UTF-8, so a Secret value that is not UTF-8 cannot be passed as it is.
/// external-provisioner converts with Go's `string(bytes)` and its
/// protobuf library then refuses to encode the request; we refuse before
/// the call, saying which key, rather than alter the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {key:?} holds bytes that are not UTF-8 text, which CSI cannot carry \
     (its secrets are strings): store the value as text, e.g. base64 encoded"
)]
pub struct NotText {
    pub key: String,
}

impl Secrets {
    /// A Secret's `data`, byte for byte: every value that is UTF-8 is kept
    /// exactly as stored.
    pub fn from_data(data: BTreeMap<String, Vec<u8>>) -> Result<Self, NotText> {
        data.into_iter()
            .map(|(key, bytes)| match String::from_utf8(bytes) {
                Ok(value) => Ok((key, value)),
                Err(_) => Err(NotText { key }),
            })
            .collect::<Result<_, _>>()
            .map(Secrets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The map a CSI request carries.
    pub fn into_csi(self) -> HashMap<String, String> {
        self.0.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for Secrets {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Secrets(iter.into_iter().collect())
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::proto::redacted(f, self.0.keys())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_passed_byte_for_byte_and_other_bytes_are_refused_by_key() {
        let exact = "p\u{e4}ss\0word \u{1f511}\n\r\t ".to_string();
        let data = BTreeMap::from([
            ("password".to_string(), exact.clone().into_bytes()),
            ("empty".to_string(), Vec::new()),
        ]);
        let secrets = Secrets::from_data(data).unwrap();
        let csi = secrets.into_csi();
        assert_eq!(csi["password"].as_bytes(), exact.as_bytes());
        assert_eq!(csi["empty"], "");

        let binary = BTreeMap::from([
            ("ok".to_string(), b"fine".to_vec()),
            ("key.der".to_string(), vec![0x30, 0x82, 0xff, 0xfe]),
        ]);
        let err = Secrets::from_data(binary).unwrap_err();
        assert_eq!(err.key, "key.der");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn debug_shows_keys_only() {
        let secrets: Secrets = [("password".to_string(), "hunter2".to_string())]
            .into_iter()
            .collect();
        let shown = format!("{secrets:?} {secrets:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("\"password\": <redacted>"), "{shown}");
    }
}
