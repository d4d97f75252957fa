//! One watch per kind, shared by every job, that nothing downstream can
//! stall.
//!
//! A watch feeds its cache (a kube-runtime reflector store) and then hands
//! each change to the jobs that subscribed to the kind, on unbounded
//! channels: a job that has not started consuming yet (it waits for the
//! lease, or for the other caches) costs memory, never progress of the
//! watch. An earlier version used bounded channels and waited for every
//! cache before any job consumed; a cluster with more claims than one
//! channel held never finished its first list. kube-runtime's own
//! subscriber streams (`Writer::new_shared`) are bounded too, back-pressure
//! the watch when one subscriber lags, and cannot carry deletions.
//!
//! Deletions go to `on_delete` hooks, which turn them into reconcile
//! requests for related objects. An object that vanished while the watch
//! was cut (the watch expired with 410 Gone and the watcher listed again)
//! never gets a delete event of its own: the relist is compared with the
//! cache it replaces, and whatever is missing, or came back with another
//! UID, is reported deleted.
//!
//! A kind may keep only the objects in its scope (`keep_only`, see
//! `scope`): the rest never reach the cache or a job.

mod feed;
mod progress;
mod relist;
mod stream;

pub use progress::{ProgressState, WatchProgress};
pub(crate) use relist::Relist;

use std::fmt::Debug;
use std::sync::Arc;

use futures::{FutureExt, Stream};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttachment};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::Stores;
use super::metrics::KindLabels;
use crate::controller::cached_claim::Claim;
use crate::controller::cached_pv::Pv;
use crate::crd::{StorageNode, Volume};

/// What the informers need of a kind.
pub trait Kind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
}

impl<K> Kind for K where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
}

type Hook<K> = Box<dyn Fn(&K) + Send + Sync + 'static>;
type Scope<K> = Box<dyn Fn(&K) -> bool + Send + Sync + 'static>;

/// The watch of one kind: its cache, its subscribers, its deletion hooks.
pub struct Informer<K: Kind> {
    store: Store<K>,
    writer: reflector::store::Writer<K>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<K>>>,
    on_apply: Vec<Hook<K>>,
    on_delete: Vec<Hook<K>>,
    scope: Option<Scope<K>>,
    progress: Arc<WatchProgress>,
}

impl<K: Kind> Default for Informer<K> {
    fn default() -> Self {
        let (store, writer) = reflector::store();
        Informer {
            store,
            writer,
            subscribers: Vec::new(),
            on_apply: Vec::new(),
            on_delete: Vec::new(),
            scope: None,
            progress: Arc::new(WatchProgress::new(K::kind(&()).into_owned())),
        }
    }
}

impl<K: Kind> Informer<K> {
    /// The cache: complete once `wait_until_ready` returns.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Every object created or changed from now on (after the first list:
    /// every object), to trigger a job's reconciles. Subscribe before
    /// `run`.
    pub fn subscribe(&mut self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(tx);
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
    }

    /// Calls `hook` with each object created or changed, once it is in the
    /// cache, before any job hears of it: for indexes. It runs on the
    /// watch's task: keep it short and never block.
    pub fn on_apply(&mut self, hook: impl Fn(&K) + Send + Sync + 'static) {
        self.on_apply.push(Box::new(hook));
    }

    /// Calls `hook` with each object deleted, after it left the cache. It
    /// runs on the watch's task: keep it short and never block.
    pub fn on_delete(&mut self, hook: impl Fn(&K) + Send + Sync + 'static) {
        self.on_delete.push(Box::new(hook));
    }

    /// Caches and hands on only the objects `keep` accepts. An object
    /// that stops being accepted leaves the cache, and the deletion hooks
    /// hear of it as if it were deleted.
    pub fn keep_only(&mut self, keep: impl Fn(&K) -> bool + Send + Sync + 'static) {
        self.scope = Some(Box::new(keep));
    }

    pub fn progress(&self) -> Arc<WatchProgress> {
        self.progress.clone()
    }

    /// Keeps `gauge` at the number of objects in the cache.
    pub fn count_into(&mut self, gauge: Gauge) {
        let (store, applied) = (self.store.clone(), gauge.clone());
        self.on_apply(move |_| {
            applied.set(store.len() as i64);
        });
        let store = self.store.clone();
        self.on_delete(move |_| {
            gauge.set(store.len() as i64);
        });
    }

    /// Watches the kind until the process ends.
    pub fn run(self, api: Api<K>) -> impl Future<Output = ()> + Send + 'static {
        self.run_on(stream::events(api))
    }
}

/// Every watch the controller runs.
#[derive(Default)]
pub struct Informers {
    pub claims: Informer<Claim>,
    pub pvs: Informer<Pv>,
    pub volumes: Informer<Volume>,
    pub classes: Informer<StorageClass>,
    pub storage_nodes: Informer<StorageNode>,
    pub attachments: Informer<VolumeAttachment>,
    pub csinodes: Informer<CSINode>,
    /// Metadata only: labels and annotations are all attach and topology read.
    pub nodes: Informer<PartialObjectMeta<Node>>,
}

impl Informers {
    pub fn stores(&self) -> Stores {
        Stores {
            claims: self.claims.store(),
            pvs: self.pvs.store(),
            classes: self.classes.store(),
            volumes: self.volumes.store(),
            storage_nodes: self.storage_nodes.store(),
            attachments: self.attachments.store(),
            csinodes: self.csinodes.store(),
            nodes: self.nodes.store(),
        }
    }

    pub fn progress(&self) -> Vec<Arc<WatchProgress>> {
        vec![
            self.claims.progress(),
            self.pvs.progress(),
            self.volumes.progress(),
            self.classes.progress(),
            self.storage_nodes.progress(),
            self.attachments.progress(),
            self.csinodes.progress(),
            self.nodes.progress(),
        ]
    }

    /// Keeps the `cached_objects` gauge of each kind.
    pub fn count_into(&mut self, gauges: &Family<KindLabels, Gauge>) {
        let gauge = |kind: &str| {
            gauges
                .get_or_create(&KindLabels { kind: kind.into() })
                .clone()
        };
        self.claims.count_into(gauge("PersistentVolumeClaim"));
        self.pvs.count_into(gauge("PersistentVolume"));
        self.volumes.count_into(gauge("Volume"));
        self.classes.count_into(gauge("StorageClass"));
        self.storage_nodes.count_into(gauge("StorageNode"));
        self.attachments.count_into(gauge("VolumeAttachment"));
        self.csinodes.count_into(gauge("CSINode"));
        self.nodes.count_into(gauge("Node"));
    }

    /// Runs every watch until the process ends. Jobs subscribe first.
    pub fn run(self, client: &Client) -> impl Future<Output = ()> + Send + 'static {
        let c = || client.clone();
        // Which claims and PVs are kept depends on their class (see
        // `scope`): those watches start once the classes are listed.
        let classes = self.classes.progress();
        let after_classes = |watch: futures::future::BoxFuture<'static, ()>| {
            let classes = classes.clone();
            async move {
                classes.listed().await;
                watch.await
            }
            .boxed()
        };
        let watches = [
            after_classes(self.claims.run(Api::all(c())).boxed()),
            after_classes(self.pvs.run(Api::all(c())).boxed()),
            self.volumes.run(Api::all(c())).boxed(),
            self.classes.run(Api::all(c())).boxed(),
            self.storage_nodes.run(Api::all(c())).boxed(),
            self.attachments.run(Api::all(c())).boxed(),
            self.csinodes.run(Api::all(c())).boxed(),
            self.nodes.run(Api::all(c())).boxed(),
        ];
        async move {
            futures::future::join_all(watches).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt, stream};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;
    use kube::runtime::watcher;
    use std::sync::Mutex;

    use crate::testing::config_map as object;

    fn list(objects: &[ConfigMap]) -> Vec<watcher::Result<watcher::Event<ConfigMap>>> {
        let mut events = vec![Ok(watcher::Event::Init)];
        events.extend(
            objects
                .iter()
                .cloned()
                .map(|o| Ok(watcher::Event::InitApply(o))),
        );
        events.push(Ok(watcher::Event::InitDone));
        events
    }

    /// Runs an informer over `events`; returns what its subscriber and its
    /// deletion hook saw.
    async fn feed(
        events: Vec<watcher::Result<watcher::Event<ConfigMap>>>,
    ) -> (Vec<String>, Vec<String>) {
        let mut informer = Informer::<ConfigMap>::default();
        let applied = informer.subscribe();
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let seen = deleted.clone();
        informer.on_delete(move |o| seen.lock().unwrap().push(o.name_any()));
        informer.run_on(stream::iter(events)).await;
        let applied: Vec<_> = applied.map(|o| o.name_any()).collect().await;
        let deleted = deleted.lock().unwrap().clone();
        (applied, deleted)
    }

    #[tokio::test]
    async fn an_object_missing_from_a_relist_is_reported_deleted() {
        let (a, b) = (object("a", "1", "10"), object("b", "2", "11"));
        let mut events = list(&[a.clone(), b.clone()]);
        // The watch was cut; "b" was deleted meanwhile, "a" did not change.
        events.extend(list(&[a]));
        let (applied, deleted) = feed(events).await;
        assert_eq!(deleted, ["b"]);
        assert_eq!(
            applied.iter().filter(|n| *n == "a").count(),
            1,
            "unchanged a resent: {applied:?}"
        );
    }

    #[tokio::test]
    async fn an_object_recreated_during_a_gap_is_deleted_then_applied() {
        let old = object("a", "1", "10");
        let new = object("a", "2", "20");
        let mut events = list(&[old]);
        events.extend(list(&[new]));
        let (applied, deleted) = feed(events).await;
        assert_eq!(deleted, ["a"]);
        assert_eq!(applied, ["a", "a"]);
    }

    #[tokio::test]
    async fn watch_deletions_reach_the_hooks_and_changes_the_subscribers() {
        let a = object("a", "1", "10");
        let mut events = list(&[]);
        events.push(Ok(watcher::Event::Apply(a.clone())));
        events.push(Ok(watcher::Event::Delete(a)));
        let (applied, deleted) = feed(events).await;
        assert_eq!(applied, ["a"]);
        assert_eq!(deleted, ["a"]);
    }

    /// The first list completes, and the cache is ready, while no job has
    /// taken a single object from its stream: nothing between the watch and
    /// a job can fill up and stop the list.
    #[tokio::test]
    async fn a_large_first_list_completes_with_no_job_consuming() {
        let mut informer = Informer::<ConfigMap>::default();
        let store = informer.store();
        let mut unconsumed = Vec::new();
        for _ in 0..3 {
            unconsumed.push(informer.subscribe());
        }
        let objects: Vec<_> = (0..5000)
            .map(|i| object(&format!("o{i}"), &i.to_string(), "1"))
            .collect();
        let events = stream::iter(list(&objects)).chain(stream::pending());
        tokio::spawn(informer.run_on(events));
        tokio::time::timeout(std::time::Duration::from_secs(10), store.wait_until_ready())
            .await
            .expect("cache not ready while jobs were not consuming")
            .unwrap();
        assert_eq!(store.len(), 5000);
        let mut first = unconsumed.into_iter().next().unwrap();
        assert!(first.next().await.is_some(), "subscriber got nothing");
    }

    /// The watcher announces each list attempt; attempts that fail are no
    /// progress, so the stall clock keeps running.
    #[tokio::test(start_paused = true)]
    async fn a_list_that_keeps_failing_makes_no_progress() {
        let informer = Informer::<ConfigMap>::default();
        let progress = informer.progress();
        let started = progress.state().last_event;
        tokio::time::advance(std::time::Duration::from_secs(30)).await;
        let attempts = (0..3).flat_map(|_| {
            [
                Ok(watcher::Event::Init),
                Err(watcher::Error::NoResourceVersion),
            ]
        });
        informer.run_on(stream::iter(attempts)).await;
        let state = progress.state();
        assert!(!state.listed);
        assert_eq!(state.last_event, started);
    }

    #[tokio::test]
    async fn progress_tracks_lists() {
        let informer = Informer::<ConfigMap>::default();
        let progress = informer.progress();
        assert!(!progress.state().listed);
        informer
            .run_on(stream::iter(list(&[object("a", "1", "1")])))
            .await;
        assert!(progress.state().listed);
        tokio::time::timeout(std::time::Duration::from_secs(1), progress.listed())
            .await
            .expect("listed() did not resolve after a list");
        assert_eq!(progress.kind(), "ConfigMap");
    }
}
