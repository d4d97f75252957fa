use super::*;
use serde_json::json;

const ZONE: &str = "zone";
const HOST: &str = "host";

fn node(name: &str, keys: &[&str], labels: &[(&str, &str)]) -> DriverNode {
    DriverNode {
        name: name.into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
    }
}

fn seg(pairs: &[(&str, &str)]) -> Segment {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Three nodes in zones a, b, a, each its own host.
fn cluster() -> Vec<DriverNode> {
    vec![
        node("n1", &[ZONE, HOST], &[(ZONE, "a"), (HOST, "n1")]),
        node("n2", &[ZONE, HOST], &[(ZONE, "b"), (HOST, "n2")]),
        node("n3", &[ZONE, HOST], &[(ZONE, "a"), (HOST, "n3")]),
    ]
}

fn allowed(terms: serde_json::Value) -> Vec<TopologySelectorTerm> {
    serde_json::from_value(terms).unwrap()
}

fn req(
    claim: &str,
    allowed: &[TopologySelectorTerm],
    selected: Option<&str>,
    nodes: &[DriverNode],
) -> Result<Option<Requirement>, TopologyError> {
    requirement("d", claim, allowed, selected, nodes)
}

#[test]
fn fnv1_is_gos_hash_fnv_new32() {
    assert_eq!(fnv1_32(b""), 0x811c_9dc5);
    assert_eq!(fnv1_32(b"a"), 0x050c_5d7e);
    assert_eq!(fnv1_32(b"foobar"), 0x31f0_b262);
}

#[test]
fn statefulset_names_hash_the_set_and_add_the_ordinal() {
    let web = fnv1_32(b"web");
    assert_eq!(name_hash_and_ordinal("data-web-1"), (web, 1));
    assert_eq!(name_hash_and_ordinal("logs-web-1"), (web, 1));
    assert_eq!(name_hash_and_ordinal("web-7"), (web, 7));
    assert_eq!(name_hash_and_ordinal("a-b-web-0"), (web, 0));
    // Not an ordinal: the whole name.
    for name in [
        "rwo",
        "data-web",
        "web-+1",
        "web-",
        "web-1x",
        "web-4294967296",
    ] {
        assert_eq!(name_hash_and_ordinal(name), (fnv1_32(name.as_bytes()), 0));
    }
}

#[test]
fn immediate_asks_for_every_segment_sorted_and_prefers_a_rotation_by_name() {
    let nodes = cluster();
    let r = req("data-web-0", &[], None, &nodes).unwrap().unwrap();
    let all = vec![
        seg(&[(HOST, "n1"), (ZONE, "a")]),
        seg(&[(HOST, "n2"), (ZONE, "b")]),
        seg(&[(HOST, "n3"), (ZONE, "a")]),
    ];
    assert_eq!(r.requisite, all);
    let start = (fnv1_32(b"web") % 3) as usize;
    let mut rotated = all.clone();
    rotated.rotate_left(start);
    assert_eq!(r.preferred, rotated);
    // The next replica starts one further on: replicas go round.
    let next = req("data-web-1", &[], None, &nodes).unwrap().unwrap();
    rotated.rotate_left(1);
    assert_eq!(next.preferred, rotated);
    assert_eq!(next.requisite, all);
}

#[test]
fn immediate_aggregates_each_registered_key_set_on_its_own() {
    // n1 registered the zone only; n2 zone and host. n2 counts under
    // both key sets, n1 under the zone alone, whatever labels it has.
    let nodes = vec![
        node("n1", &[ZONE], &[(ZONE, "a"), (HOST, "n1")]),
        node("n2", &[ZONE, HOST], &[(ZONE, "b"), (HOST, "n2")]),
        node("n3", &[], &[(ZONE, "c")]),
        DriverNode {
            labels: None,
            ..node("gone", &[ZONE], &[])
        },
    ];
    let r = req("rwo", &[], None, &nodes).unwrap().unwrap();
    assert_eq!(
        r.requisite,
        vec![
            seg(&[(ZONE, "a")]),
            seg(&[(ZONE, "b")]),
            seg(&[(HOST, "n2"), (ZONE, "b")]),
        ]
    );
}

#[test]
fn segments_sort_by_size_first() {
    let mut s = vec![
        seg(&[("a", "1"), ("c", "1")]),
        seg(&[("b", "1")]),
        seg(&[("a", "2")]),
    ];
    s.sort_by(compare);
    assert_eq!(
        s,
        vec![
            seg(&[("a", "2")]),
            seg(&[("b", "1")]),
            seg(&[("a", "1"), ("c", "1")])
        ]
    );
}

#[test]
fn no_keys_registered_asks_for_no_topology() {
    let nodes = vec![node("n1", &[], &[(ZONE, "a")])];
    assert_eq!(req("rwo", &[], None, &nodes), Ok(None));
    assert_eq!(req("rwo", &[], Some("n1"), &nodes), Ok(None));
    assert_eq!(req("rwo", &[], None, &[]), Ok(None));
}

#[test]
fn keys_registered_but_on_no_labelled_node_wait() {
    let nodes = vec![node("n1", &[ZONE], &[])];
    assert!(matches!(
        req("rwo", &[], None, &nodes),
        Err(TopologyError::NoLabelledNode { .. })
    ));
}

#[test]
fn allowed_topologies_are_distributed_into_segments() {
    let terms = allowed(json!([
        { "matchLabelExpressions": [
            { "key": ZONE, "values": ["b", "a"] },
            { "key": "rack", "values": ["r1", "r2"] },
        ] },
        { "matchLabelExpressions": [{ "key": ZONE, "values": ["c"] }] },
        { "matchLabelExpressions": [] },
    ]));
    let r = req("rwo", &terms, None, &cluster()).unwrap().unwrap();
    assert_eq!(
        r.requisite,
        vec![
            seg(&[(ZONE, "c")]),
            seg(&[("rack", "r1"), (ZONE, "a")]),
            seg(&[("rack", "r1"), (ZONE, "b")]),
            seg(&[("rack", "r2"), (ZONE, "a")]),
            seg(&[("rack", "r2"), (ZONE, "b")]),
        ],
        "not limited to where nodes are"
    );
    let mut rotated = r.requisite.clone();
    rotated.rotate_left((fnv1_32(b"rwo") % 5) as usize);
    assert_eq!(r.preferred, rotated);
}

#[test]
fn an_expression_without_values_restarts_its_term() {
    let terms = allowed(json!([{ "matchLabelExpressions": [
        { "key": ZONE, "values": ["a"] },
        { "key": "rack", "values": [] },
        { "key": HOST, "values": ["n1"] },
    ] }]));
    let r = req("rwo", &terms, None, &[]).unwrap().unwrap();
    assert_eq!(r.requisite, vec![seg(&[(HOST, "n1")])]);
}

#[test]
fn wait_for_first_consumer_asks_for_every_node_with_the_chosen_nodes_keys_and_prefers_its_segment()
{
    let nodes = cluster();
    let r = req("late", &[], Some("n2"), &nodes).unwrap().unwrap();
    let (n1, n2, n3) = (
        seg(&[(HOST, "n1"), (ZONE, "a")]),
        seg(&[(HOST, "n2"), (ZONE, "b")]),
        seg(&[(HOST, "n3"), (ZONE, "a")]),
    );
    assert_eq!(r.requisite, vec![n1.clone(), n2.clone(), n3.clone()]);
    assert_eq!(r.preferred, vec![n2, n3, n1]);
}

#[test]
fn wait_for_first_consumer_with_allowed_topologies_prefers_the_first_segment_the_node_is_in() {
    let terms = allowed(json!([{ "matchLabelExpressions": [
        { "key": ZONE, "values": ["a", "b", "c"] },
    ] }]));
    let r = req("late", &terms, Some("n2"), &cluster())
        .unwrap()
        .unwrap();
    let (a, b, c) = (
        seg(&[(ZONE, "a")]),
        seg(&[(ZONE, "b")]),
        seg(&[(ZONE, "c")]),
    );
    assert_eq!(r.requisite, vec![a.clone(), b.clone(), c.clone()]);
    assert_eq!(r.preferred, vec![b, c, a]);

    let outside = allowed(json!([{ "matchLabelExpressions": [
        { "key": ZONE, "values": ["c"] },
    ] }]));
    assert_eq!(
        req("late", &outside, Some("n2"), &cluster()),
        Err(TopologyError::NotAllowed {
            node: "n2".into(),
            segment: seg(&[(HOST, "n2"), (ZONE, "b")]),
        })
    );
}

#[test]
fn the_chosen_node_must_be_registered_and_labelled() {
    let nodes = vec![node("n1", &[ZONE, HOST], &[(ZONE, "a")])];
    assert!(matches!(
        req("late", &[], Some("n9"), &nodes),
        Err(TopologyError::NotRegistered { .. })
    ));
    assert!(matches!(
        req("late", &[], Some("n1"), &nodes),
        Err(TopologyError::NodeUnlabelled { .. })
    ));
}
