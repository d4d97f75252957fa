//! Where a watch's events come from: the initial state streamed over the
//! watch itself (`sendInitialEvents`, Kubernetes' WatchList), else lists
//! in pages.
//!
//! A list answers with every object of the kind in one body, all of it
//! decoded before the first object can be looked at: on a cluster of 50 000
//! PVs that is hundreds of MiB held at once, most of it other drivers'
//! objects the scope drops anyway. A streamed list hands over one object at
//! a time, so only what the cache keeps stays. WatchList is on by default
//! in Kubernetes 1.32 and from 1.34 on; 1.30, 1.31 and 1.33 refuse the
//! parameter with 422, and the watch then lists in pages of 500 (never
//! `resourceVersion=0`, which the watch cache answers in one piece).

use futures::{Stream, StreamExt, future};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::Kind;

/// The events of `api`'s kind, managedFields dropped: nothing here reads
/// them, and they are the largest part of most objects' metadata.
pub fn events<K: Kind>(api: Api<K>) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> {
    let streamed = api.clone();
    fallback(
        move || watcher(streamed, watcher::Config::default().streaming_lists()),
        move || watcher(api, watcher::Config::default()),
    )
    .default_backoff()
    .modify(|o| o.meta_mut().managed_fields = None)
}

/// `first`'s events until it is refused for a parameter the API server does
/// not know (422 or 400 before any event arrived); `second`'s from then on.
fn fallback<K, A, B>(
    first: impl FnOnce() -> A,
    second: impl FnOnce() -> B,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>>
where
    K: Kind,
    A: Stream<Item = watcher::Result<watcher::Event<K>>>,
    B: Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    let mut delivered = false;
    let first = first().take_while(move |event| {
        let refused = !delivered && event.as_ref().is_err_and(refusal);
        delivered |= event.is_ok();
        future::ready(!refused)
    });
    // The refused watch is the only way `first` ends: a watcher retries
    // every other error itself.
    let second = futures::stream::once(future::lazy(move |_| {
        tracing::info!(
            kind = %K::kind(&()),
            "the API server does not stream initial lists (WatchList): listing in pages"
        );
        second()
    }))
    .flatten();
    first.chain(second)
}

fn refusal(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            matches!(status.code, 400 | 422)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;

    use crate::testing::config_map;

    type Event = watcher::Result<watcher::Event<ConfigMap>>;

    fn refused(code: u16) -> Event {
        let status = kube::core::Status::failure("sendInitialEvents is forbidden", "Invalid")
            .with_code(code);
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(
            Box::new(status),
        )))
    }

    fn listed(name: &str) -> Vec<Event> {
        vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(config_map(name, "1", "1"))),
            Ok(watcher::Event::InitDone),
        ]
    }

    /// The first `n` events through, as names (Init and InitDone as
    /// markers). Like a watcher, the first stream never ends by itself.
    async fn through(first: Vec<Event>, second: Vec<Event>, n: usize) -> Vec<String> {
        let first = stream::iter(first).chain(stream::pending());
        fallback(move || first, move || stream::iter(second))
            .take(n)
            .map(|e| match e {
                Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => o.name_any(),
                Ok(watcher::Event::Init) => "init".into(),
                Ok(watcher::Event::InitDone) => "done".into(),
                Ok(watcher::Event::Delete(o)) => format!("-{}", o.name_any()),
                Err(e) => format!("error: {e}"),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_refused_streaming_watch_falls_back_to_lists() {
        for code in [400, 422] {
            let seen = through(vec![refused(code)], listed("a"), 3).await;
            assert_eq!(seen, ["init", "a", "done"], "code {code}");
        }
    }

    #[tokio::test]
    async fn a_streaming_watch_that_works_is_kept() {
        let mut first = listed("a");
        first.push(Ok(watcher::Event::Apply(config_map("b", "2", "2"))));
        let seen = through(first, listed("never"), 4).await;
        assert_eq!(seen, ["init", "a", "done", "b"]);
    }

    /// Other failures are the watcher's to retry: passed on, no fallback.
    #[tokio::test]
    async fn other_errors_do_not_switch() {
        let mut first = vec![refused(403)];
        first.extend(listed("a"));
        let seen = through(first, listed("never"), 4).await;
        assert!(seen[0].starts_with("error"), "{seen:?}");
        assert_eq!(seen[1..], ["init", "a", "done"]);
        // A 422 after the stream delivered is not about the parameter.
        let mut first = listed("a");
        first.push(refused(422));
        first.extend(listed("b"));
        let seen = through(first, listed("never"), 7).await;
        assert_eq!(seen[..3], ["init", "a", "done"]);
        assert!(seen[3].starts_with("error"), "{seen:?}");
        assert_eq!(seen[4..], ["init", "b", "done"]);
    }
}
