//! A model's `config.json` (the transformers configuration), read once for every architecture: which
//! architecture it describes (refusing, by name, the ones this engine does not run) and its typed values,
//! each missing or mistyped key an error naming it.

use serde_json::Value;

use super::catalog::Architecture;
use super::ModelError;

/// A parsed `config.json` and the architecture it names.
pub struct ModelConfig {
    json: Value,
    pub architecture: Architecture,
}

/// `model_type`s of BERT's relatives that need an engine this server does not have.
const REFUSED: [(&str, &str); 8] = [
    ("roberta", "RoBERTa"),
    ("xlm-roberta", "XLM-RoBERTa"),
    ("xlm_roberta", "XLM-RoBERTa"),
    ("camembert", "CamemBERT (RoBERTa)"),
    ("mpnet", "MPNet"),
    ("distilbert", "DistilBERT"),
    ("deberta-v2", "DeBERTa-v2"),
    ("modernbert", "ModernBERT"),
];

impl ModelConfig {
    pub fn parse(bytes: &[u8]) -> Result<ModelConfig, ModelError> {
        let json: Value = serde_json::from_slice(bytes)
            .map_err(|e| ModelError::new(format!("config.json is not valid JSON: {e}")))?;
        let model_type = json["model_type"].as_str();
        let class = json["architectures"][0].as_str();
        let architecture = match (model_type, class) {
            (Some("bert"), _) => Architecture::Bert,
            (Some("nomic_bert"), _) => Architecture::NomicBert,
            (None, Some(c)) if c.starts_with("NomicBert") => Architecture::NomicBert,
            (None, Some(c)) if c.starts_with("Bert") => Architecture::Bert,
            _ => {
                let named = model_type.or(class).unwrap_or("(none)");
                let family = REFUSED
                    .iter()
                    .find(|(t, _)| model_type == Some(*t))
                    .map_or(String::new(), |(_, family)| format!(" ({family})"));
                return Err(ModelError::new(format!(
                    "config.json: model_type {named:?}{family}{} is not supported: this server runs BERT \
                     (model_type \"bert\") and NomicBERT (\"nomic_bert\") encoders",
                    class.map_or(String::new(), |c| format!(", architecture {c}")),
                )));
            }
        };
        Ok(ModelConfig { json, architecture })
    }

    /// The raw JSON, for settings only one architecture has.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// A required integer.
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        usize_of(&self.json, key)
    }

    /// The width of the token states (and so of the pooled vector).
    pub fn width(&self) -> Result<usize, ModelError> {
        match self.architecture {
            Architecture::Bert => self.usize("hidden_size"),
            Architecture::NomicBert => self.usize("n_embd"),
        }
    }

    /// Whether `architectures` names a sequence-classification head (`BertForSequenceClassification`): a
    /// cross-encoder, as sentence-transformers' `CrossEncoder` saves one.
    pub fn is_sequence_classifier(&self) -> bool {
        self.json["architectures"][0]
            .as_str()
            .is_some_and(|class| class.ends_with("ForSequenceClassification"))
    }

    /// The classifier's label names in id order, as transformers counts them: `id2label`, else
    /// `num_labels` unnamed labels, else its default of two.
    pub fn labels(&self) -> Vec<String> {
        if let Some(names) = self.json["id2label"].as_object() {
            let mut labels: Vec<(u64, String)> = names
                .iter()
                .map(|(id, name)| {
                    let name = name.as_str().map_or_else(|| name.to_string(), String::from);
                    (id.parse().unwrap_or(u64::MAX), name)
                })
                .collect();
            labels.sort();
            return labels.into_iter().map(|(_, name)| name).collect();
        }
        let count = self.json["num_labels"].as_u64().unwrap_or(2);
        (0..count).map(|i| format!("LABEL_{i}")).collect()
    }

    /// How many positions the weights can place.
    pub fn positions(&self) -> Result<usize, ModelError> {
        match self.architecture {
            Architecture::Bert => self.usize("max_position_embeddings"),
            Architecture::NomicBert => self.usize("n_positions"),
        }
    }
}

/// An integer of a model's config.json, or an error naming the missing key.
pub fn usize_of(config: &Value, key: &str) -> Result<usize, ModelError> {
    config[key]
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| ModelError::new(format!("config.json lacks the integer \"{key}\"")))
}

/// A number of config.json that has a default when absent; present but not a number is an error.
pub fn f64_or(config: &Value, key: &str, default: f64) -> Result<f64, ModelError> {
    match &config[key] {
        Value::Null => Ok(default),
        value => value
            .as_f64()
            .ok_or_else(|| ModelError::new(format!("config.json: \"{key}\" must be a number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<ModelConfig, ModelError> {
        ModelConfig::parse(json.to_string().as_bytes())
    }

    #[test]
    fn names_the_architecture() {
        let bert = parse(serde_json::json!({"model_type": "bert", "hidden_size": 8})).unwrap();
        assert_eq!(bert.architecture, Architecture::Bert);
        assert_eq!(bert.width().unwrap(), 8);
        let nomic = parse(serde_json::json!({"architectures": ["NomicBertModel"]})).unwrap();
        assert_eq!(nomic.architecture, Architecture::NomicBert);
    }

    #[test]
    fn refuses_other_families_by_name() {
        for (model_type, says) in [
            ("roberta", "RoBERTa"),
            ("xlm-roberta", "XLM-RoBERTa"),
            ("mpnet", "MPNet"),
            ("gpt2", "gpt2"),
        ] {
            let error = parse(serde_json::json!({"model_type": model_type}))
                .err()
                .unwrap()
                .message;
            assert!(error.contains(says), "{model_type}: {error}");
        }
    }

    #[test]
    fn labels_count_as_transformers_counts_them() {
        let named = parse(serde_json::json!({
            "model_type": "bert",
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"1": "entailment", "0": "contradiction", "2": "neutral"}
        }))
        .unwrap();
        assert!(named.is_sequence_classifier());
        assert_eq!(named.labels(), ["contradiction", "entailment", "neutral"]);
        let counted = parse(serde_json::json!({"model_type": "bert", "num_labels": 1})).unwrap();
        assert_eq!(counted.labels(), ["LABEL_0"]);
        assert!(!counted.is_sequence_classifier());
        let default = parse(serde_json::json!({"model_type": "bert"})).unwrap();
        assert_eq!(default.labels().len(), 2);
    }

    #[test]
    fn a_missing_or_mistyped_value_is_named() {
        let config =
            parse(serde_json::json!({"model_type": "bert", "layer_norm_eps": "x"})).unwrap();
        assert!(config
            .usize("num_hidden_layers")
            .err()
            .unwrap()
            .message
            .contains("num_hidden_layers"));
        assert!(f64_or(config.json(), "layer_norm_eps", 1e-12).is_err());
        assert_eq!(f64_or(config.json(), "absent", 2.5).unwrap(), 2.5);
    }
}
