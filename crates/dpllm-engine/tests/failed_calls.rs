//! A forward call whose activations overflow reports the first stage that went
//! non-finite (the checks are read after the call, on every backend) and
//! leaves the KV cache as it found it, in every layer.

use dpllm_engine::Model;
use dpllm_testkit::{edit_tensor, write_tiny_model, TinySpec};
use safetensors::Dtype;

#[test]
fn a_failed_call_names_its_stage_and_leaves_the_cache_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        dtype: Dtype::F32,
        ..TinySpec::default()
    };
    write_tiny_model(dir.path(), &spec, 9).unwrap();
    // Layer 1's MLP input norm scaled to overflow: layer 0 stays finite and
    // appends its keys and values before layer 1 fails.
    edit_tensor(
        dir.path(),
        "model.layers.1.post_attention_layernorm.weight",
        |v| v.iter_mut().for_each(|x| *x = 3.0e38),
    )
    .unwrap();
    let m = Model::load(dir.path()).unwrap();
    let mut cache = m.new_cache(16);
    let e = m.forward_last(&[1, 2, 3], &mut cache).unwrap_err();
    assert!(e.to_string().contains("layer 1 (MLP output)"), "{e}");
    assert_eq!((cache.len(), cache.bytes()), (0, 0));
    assert!(m.forward_hidden(&[4], &mut cache).is_err());
    assert_eq!((cache.len(), cache.bytes()), (0, 0));
}
