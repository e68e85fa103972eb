//! `--expert-stats FILE`: how often each expert of each layer was chosen, kept in a JSON file
//! across runs, so that a calibration run can inform where experts are placed.
//!
//! ```json
//! {"format": "weir-expert-stats", "version": 1,
//!  "layers": [{"layer": 0, "tokens": 1234, "chosen": [310, 298, …]}, …]}
//! ```
//! `tokens`: tokens routed in that layer; `chosen[e]`: how many of them chose expert `e` (each
//! token chooses `top_k` experts, so the counts add up to `top_k × tokens`).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;
use weir_operators::RoutingStats;

/// Adds the counts in `path` to `stats`.
pub fn load(stats: &RoutingStats, path: &Path) -> Result<()> {
    let bad = |what: String| Error::Request(format!("--expert-stats {}: {what}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    if v["format"] != "weir-expert-stats" || v["version"] != 1 {
        return Err(bad("not a weir expert-stats file (version 1)".into()));
    }
    let layers = v["layers"].as_array().ok_or_else(|| bad("`layers` must be a list".into()))?;
    let mut read = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let num = |k: &str| l[k].as_u64().ok_or_else(|| bad(format!("layers[{i}].{k} must be a non-negative integer")));
        let chosen = l["chosen"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| bad(format!("layers[{i}].chosen must be a list of counts")))?;
        read.push((num("layer")? as u32, num("tokens")?, chosen));
    }
    // Every entry checked before any is added: a bad file changes nothing.
    for (layer, tokens, chosen) in read {
        stats.merge(layer, tokens, &chosen);
    }
    Ok(())
}

/// How often each expert of each layer was chosen per token routed, from the file at `path`.
pub fn popularity(path: &Path) -> Result<std::collections::HashMap<u32, Vec<f64>>> {
    let stats = RoutingStats::default();
    load(&stats, path)?;
    Ok(stats.popularity())
}

/// Writes `stats` to `path` (replacing it).
pub fn save(stats: &RoutingStats, path: &Path) -> Result<()> {
    let layers: Vec<Value> = stats
        .counts()
        .into_iter()
        .map(|(layer, (tokens, chosen))| json!({"layer": layer, "tokens": tokens, "chosen": chosen}))
        .collect();
    let v = json!({"format": "weir-expert-stats", "version": 1, "layers": layers});
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default())
        .map_err(|e| Error::Request(format!("--expert-stats {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_accumulate_and_bad_files_change_nothing() {
        let dir = std::env::temp_dir().join(format!("weir-expert-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.json");
        let a = RoutingStats::default();
        a.merge(0, 3, &[2, 1, 3]);
        a.merge(1, 3, &[0, 4, 2]);
        save(&a, &path).unwrap();
        let b = RoutingStats::default();
        load(&b, &path).unwrap();
        assert_eq!(b.counts(), a.counts());
        load(&b, &path).unwrap();
        assert_eq!(b.counts()[&1], (6, vec![0, 8, 4]));
        std::fs::write(&path, r#"{"format": "weir-expert-stats", "version": 1, "layers": [{"layer": 0, "tokens": 1, "chosen": [1]}, {"layer": 1, "tokens": -1, "chosen": [1]}]}"#).unwrap();
        let e = load(&b, &path).unwrap_err().to_string();
        assert!(e.contains("layers[1].tokens") && e.contains("stats.json"), "{e}");
        assert_eq!(b.counts()[&0].0, 6, "a bad file must add nothing");
        std::fs::write(&path, "{").unwrap();
        assert!(load(&b, &path).unwrap_err().to_string().contains("not JSON"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
