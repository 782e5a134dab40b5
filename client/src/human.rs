//! Output for people: byte counts, and a JSON document (a server's or director's stats) as
//! `key=value` lines and tables.

use serde_json::Value;

/// `1.5 GB`, `320.0 MB`, `512 B` (decimal units, as link rates are).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Scalars as `path.to.key=value` lines (in document order); arrays of objects as tables
/// under a `path:` heading, one row per element and a column per key of its first element.
pub fn render(v: &Value) -> String {
    let mut lines = Vec::new();
    let mut tables = Vec::new();
    walk("", v, &mut lines, &mut tables);
    let mut s = lines.join("\n");
    for t in tables {
        if !s.is_empty() {
            s.push_str("\n\n");
        }
        s.push_str(&t);
    }
    s.push('\n');
    s
}

fn walk(path: &str, v: &Value, lines: &mut Vec<String>, tables: &mut Vec<String>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                walk(&join(k), x, lines, tables);
            }
        }
        Value::Array(a) if a.iter().all(Value::is_object) && !a.is_empty() => {
            tables.push(table(path, a));
        }
        Value::Array(a) if a.is_empty() => lines.push(format!("{path}=(none)")),
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(scalar).collect();
            lines.push(format!("{path}={}", items.join(",")));
        }
        x => lines.push(format!("{path}={}", scalar(x))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        x => x.to_string(),
    }
}

fn table(name: &str, rows: &[Value]) -> String {
    let cols: Vec<String> = rows[0]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| r.get(c).map(scalar).unwrap_or_else(|| "-".into()))
                .collect()
        })
        .collect();
    let width: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        r.iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut s = format!("{name}:\n{}", line(&cols));
    for r in &cells {
        s.push('\n');
        s.push_str(&line(r));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_like_link_rates() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1_500), "1.5 kB");
        assert_eq!(bytes(320_000_000), "320.0 MB");
        assert_eq!(bytes(2_000_000_000_000), "2.0 TB");
    }

    #[test]
    fn stats_become_key_value_lines_and_tables() {
        let v = serde_json::json!({
            "counters": {"naks_received": 3, "repairs_sent": 2},
            "draining": false,
            "channels": [{"group": "239.1.0.1:7700", "title": "film", "members": 2},
                         {"group": "239.1.0.2:7700", "title": "show", "members": 10}],
            "tiers": [1, 2],
            "idle": []
        });
        let s = render(&v);
        assert!(s.contains("counters.naks_received=3\n"), "{s}");
        assert!(s.contains("draining=false\n"), "{s}");
        assert!(s.contains("tiers=1,2\n"), "{s}");
        assert!(s.contains("idle=(none)\n"), "{s}");
        assert!(s.contains("channels:\n"), "{s}");
        // Columns line up: every row starts its second column at the same place.
        let rows: Vec<&str> = s
            .lines()
            .skip_while(|l| *l != "channels:")
            .skip(1)
            .collect();
        assert_eq!(rows.len(), 3, "{s}");
        let at = |r: &str, w: &str| r.find(w).unwrap();
        assert_eq!(at(rows[1], "film"), at(rows[2], "show"), "{s}");
    }
}
