//! Chat data equals transformers: for each fixture tokenizer (fixtures/chat: a Llama 3.2
//! template in tokenizer_config.json, a ChatML template in chat_template.jinja), the ids of
//! every conversation of `conversations.jsonl` are those of transformers'
//! `apply_chat_template(tokenize=True)` and the learned tokens are its assistant mask
//! (`fixtures/chat/reference.py` wrote both with transformers 5 and tokenizers).

use std::path::PathBuf;

use kiln_models::LlamaConfig;
use kiln_trainer::config::TrainConfig;
use kiln_trainer::data::{IGNORE_INDEX, load_jsonl};
use kiln_trainer::train::tokenizer_for;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat")
}

#[test]
fn conversations_tokenize_and_mask_as_transformers_does() {
    let root = fixtures();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("reference.json")).unwrap())
            .unwrap();
    let fixed = reference["fixed_time"].as_i64().unwrap();
    let data = root.join("conversations.jsonl");
    let expected = reference["fixtures"].as_object().unwrap();
    assert_eq!(expected.len(), 2);
    for (name, rows) in expected {
        let dir = root.join(name);
        // The tokenizer comes from the pretrained folder by default (data.tokenizer = "auto").
        let mut config = TrainConfig::default();
        config.model.pretrained = Some(dir.clone());
        let model_config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
        let tokenizer = tokenizer_for(&config, &model_config).unwrap();
        let template = tokenizer
            .chat_template()
            .unwrap_or_else(|| panic!("{name}: no chat template"))
            .at_time(fixed);
        let got = load_jsonl(
            std::slice::from_ref(&data),
            &tokenizer,
            Some(&template),
            4096,
        )
        .unwrap()
        .examples;
        let rows = rows.as_array().unwrap();
        assert_eq!(got.len(), rows.len(), "{name}");
        for (i, (ex, want)) in got.iter().zip(rows).enumerate() {
            let ids: Vec<i64> = serde_json::from_value(want["input_ids"].clone()).unwrap();
            let mask: Vec<i64> = serde_json::from_value(want["assistant_masks"].clone()).unwrap();
            assert_eq!(ex.ids, ids, "{name} conversation {i}: ids");
            let labels: Vec<i64> = ids
                .iter()
                .zip(&mask)
                .map(|(&id, &m)| if m == 1 { id } else { IGNORE_INDEX })
                .collect();
            assert_eq!(ex.labels, labels, "{name} conversation {i}: learned tokens");
            assert_eq!(
                tokenizer.decode(&ex.ids).unwrap(),
                tokenizer.decode(&ids).unwrap()
            );
        }
    }
}
