//! An API call refused by RBAC is an installation problem, not a transient
//! one: say which verb on which resource is missing, on the object that
//! waits for it, so that `kubectl describe` shows what to grant.

use kube::core::Status;

/// What RBAC refused: the verb and resource the API server names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub verb: String,
    pub resource: String,
    /// The API server's own words.
    pub message: String,
}

impl Refusal {
    /// From an API error, when it is a 403.
    pub fn from_status(status: &Status) -> Option<Self> {
        if status.code != 403 {
            return None;
        }
        let (verb, resource) = parse(&status.message)?;
        Some(Refusal {
            verb,
            resource,
            message: status.message.clone(),
        })
    }

    pub fn note(&self, role: &str) -> String {
        format!(
            "the API server refused to let stowage {} {}: grant the verb {:?} on {:?} in the \
             ClusterRole {role} (manifests/). API server: {}",
            self.verb, self.resource, self.verb, self.resource, self.message
        )
    }
}

/// `... cannot create resource "persistentvolumes" in API group "" ...`
/// → ("create", "persistentvolumes"); a subresource is kept as
/// `resource/subresource`.
fn parse(message: &str) -> Option<(String, String)> {
    let after = message.split_once(" cannot ")?.1;
    let (verb, rest) = after.split_once(' ')?;
    let rest = rest.strip_prefix("resource \"")?;
    let (resource, rest) = rest.split_once('"')?;
    let resource = match rest
        .strip_prefix("/")
        .or_else(|| rest.strip_prefix(" subresource \""))
    {
        Some(sub) => match sub.split_once('"') {
            Some((sub, _)) if !sub.is_empty() => format!("{resource}/{sub}"),
            _ => resource.to_string(),
        },
        None => resource.to_string(),
    };
    Some((verb.to_string(), resource))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str) -> Status {
        let mut s = Status::failure(message, "Forbidden");
        s.code = code;
        s
    }

    #[test]
    fn names_the_verb_and_resource_the_api_server_refused() {
        let s = status(
            403,
            "persistentvolumes is forbidden: User \"system:serviceaccount:stowage-system:stowage-controller\" \
             cannot create resource \"persistentvolumes\" in API group \"\" at the cluster scope",
        );
        let r = Refusal::from_status(&s).unwrap();
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str()),
            ("create", "persistentvolumes")
        );
        let note = r.note("stowage-controller");
        assert!(
            note.contains("\"create\" on \"persistentvolumes\""),
            "{note}"
        );
        assert!(note.contains("ClusterRole stowage-controller"), "{note}");
    }

    #[test]
    fn keeps_the_subresource() {
        let s = status(
            403,
            "persistentvolumeclaims \"c\" is forbidden: User \"u\" cannot patch resource \
             \"persistentvolumeclaims/status\" in API group \"\" in the namespace \"ns\"",
        );
        assert_eq!(
            Refusal::from_status(&s).map(|r| r.resource),
            Some("persistentvolumeclaims/status".to_string())
        );
    }

    #[test]
    fn other_errors_are_not_refusals() {
        assert_eq!(Refusal::from_status(&status(409, "conflict")), None);
        assert_eq!(
            Refusal::from_status(&status(403, "forbidden: quota exceeded")),
            None
        );
    }
}
