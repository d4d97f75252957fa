//! The API idioms every job repeats, written once: dropping our finalizer
//! and deleting what may already be gone, creating what may already be
//! there, asking the API server whether an object still exists, writing
//! a status only when it changes or only over the version read, waiting
//! for a kind another project installs; and the client that names us.

use std::time::Duration;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// What the calls here need of an object's type: every kind stowage
/// reads and writes is one.
pub trait Object: Resource + Clone + DeserializeOwned + std::fmt::Debug {}

impl<K: Resource + Clone + DeserializeOwned + std::fmt::Debug> Object for K {}

type Result<T> = std::result::Result<T, kube::Error>;

/// A client from the usual config (in-cluster, or KUBECONFIG), naming
/// itself `stowage-<role>/<version>`: the API server takes the field
/// manager of our writes from it (`managedFields` otherwise says
/// "unknown"), and its audit log and request metrics show it.
pub async fn client(role: &str) -> Result<kube::Client> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let agent = format!("stowage-{role}/{}", env!("CARGO_PKG_VERSION"));
    let agent = http::HeaderValue::from_str(&agent).expect("ASCII user agent");
    config.headers.push((http::header::USER_AGENT, agent));
    kube::Client::try_from(config)
}

fn gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether a write failed because the object changed (409: a
/// compare-and-swap lost) or went (404) since it was read: nothing to
/// retry, the next look sees it anew.
pub fn changed_meanwhile(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

/// Removes `finalizer` from `object`'s list as the cache saw it. The
/// resourceVersion makes the write a compare-and-swap, so a finalizer
/// someone added meanwhile is never dropped (they get a conflict and the
/// job replans). An object already gone has no finalizer left to remove.
pub async fn remove_finalizer<K: Object>(api: &Api<K>, object: &K, finalizer: &str) -> Result<()> {
    let remaining: Vec<_> = object
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    match set_finalizers(api, object, remaining).await {
        Err(e) if gone(&e) => Ok(()),
        other => other.map(drop),
    }
}

/// Adds `finalizer` to `object`'s list as read, at its resourceVersion
/// (a compare-and-swap, as `remove_finalizer`). Already there: nothing.
pub async fn add_finalizer<K: Object>(api: &Api<K>, object: &K, finalizer: &str) -> Result<()> {
    if object.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let mut finalizers = object.finalizers().to_vec();
    finalizers.push(finalizer.to_string());
    set_finalizers(api, object, finalizers).await.map(drop)
}

/// Writes `object`'s finalizers at the version read.
async fn set_finalizers<K: Object>(api: &Api<K>, object: &K, finalizers: Vec<String>) -> Result<K> {
    let patch = json!({
        "metadata": { "finalizers": finalizers, "resourceVersion": object.resource_version() }
    });
    let params = PatchParams::default();
    api.patch(&object.name_any(), &params, &Patch::Merge(&patch))
        .await
}

/// Deletes `name`, which may already be gone. With `uid`, only that
/// object: one recreated under the same name since the cache saw it is
/// left alone (the API server answers 409, returned as an error).
pub async fn delete<K: Object>(api: &Api<K>, name: &str, uid: Option<String>) -> Result<()> {
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Err(e) if gone(&e) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Creates `object`; one already there under its name is success, since
/// every object a job creates is named after what it serves (a retry after
/// a crash finds its own earlier write).
pub async fn create_idempotent<K: Object + serde::Serialize>(
    api: &Api<K>,
    object: &K,
) -> Result<()> {
    match api.create(&PostParams::default(), object).await {
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Whether `name` exists, and with `uid` when one is given. Asks the API
/// server, not a cache: a stale cache saying "gone" must never delete data.
pub async fn exists_with_uid<K: Object>(
    api: &Api<K>,
    name: &str,
    uid: Option<&str>,
) -> Result<bool> {
    let found = api.get_opt(name).await?;
    Ok(found.is_some_and(|o| uid.is_none_or(|u| u.is_empty() || o.uid().as_deref() == Some(u))))
}

/// Merges `status` into `object`'s status, whatever its version: for
/// fields only the caller writes.
pub async fn merge_status<K: Object>(api: &Api<K>, object: &K, status: Value) -> Result<K> {
    patch_status(api, object, json!({ "status": status })).await
}

/// `merge_status`, skipped when `shown`: the caller found the object
/// already saying it. A write that changes nothing still wakes every
/// watcher of the object, so a failing job would be back at once
/// instead of after its backoff. True when written.
pub async fn merge_status_unless_shown<K: Object>(
    api: &Api<K>,
    object: &K,
    shown: bool,
    status: Value,
) -> Result<bool> {
    if shown {
        return Ok(false);
    }
    merge_status(api, object, status).await?;
    Ok(true)
}

/// Merges `status` into `object`'s status at the version the cache saw: a
/// compare-and-swap, so a status someone wrote meanwhile is never
/// overwritten from a stale plan (they get a conflict and the job replans).
pub async fn merge_status_at<K: Object>(api: &Api<K>, object: &K, status: Value) -> Result<K> {
    let patch = json!({
        "metadata": { "resourceVersion": object.resource_version() },
        "status": status,
    });
    patch_status(api, object, patch).await
}

async fn patch_status<K: Object>(api: &Api<K>, object: &K, patch: Value) -> Result<K> {
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
}

/// Returns once `api` can be listed: a kind whose CRD comes from another
/// project, perhaps only later. Asked every `poll`; says `absent` once
/// while the kind is not served and `served` when it is; other errors
/// (RBAC among them) are logged at each try.
pub async fn wait_until_served<K: Object>(
    api: &Api<K>,
    poll: Duration,
    absent: &str,
    served: &str,
) {
    let mut told = false;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => {
                tracing::info!("{served}");
                return;
            }
            Err(e) if gone(&e) => {
                if !told {
                    tracing::info!("{absent}");
                    told = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "{absent}"),
        }
        tokio::time::sleep(poll).await;
    }
}
