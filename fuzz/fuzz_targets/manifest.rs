//! The manifest loader on arbitrary bytes: it must never panic, and everything it accepts
//! must compile into a plan and render.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svcnat_core::manifest::{ClusterConfig, Manifests, ValidateError, split_documents};
use svcnat_core::plan::{NodeContext, Plan};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = ClusterConfig::default();
    // The same bytes as YAML and as JSON (a `.json` name selects the JSON reader).
    let mut m = Manifests::from_files([("fuzz.yaml", text), ("fuzz.json", text)], &cfg);
    let cluster = m.build(&cfg);
    let docs = split_documents(text);
    for e in &m.errors {
        let _ = e.to_string();
        // The loader refuses deep nesting before decoding; the decoder must agree.
        if e.file == "fuzz.yaml"
            && matches!(&e.error, ValidateError::Yaml(msg) if msg == "recursion limit exceeded")
        {
            let doc = docs
                .iter()
                .find(|d| d.index == e.document)
                .expect("the document");
            assert!(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&doc.text).is_err());
        }
    }
    let node = NodeContext::new("node-1", vec![[192, 168, 0, 1].into()], Vec::new());
    let plan = Plan::compile(&cluster, &node);
    let _ = plan.render();
    assert!(Plan::diff(&plan, &plan).is_empty());
});
