//! AWS on-demand prices. EC2's own API has none (spot prices come from its price history), so
//! they come from a dated table: the one bundled with Skyward, or a fresher one the user makes
//! from AWS's price list with `scripts/aws-prices.py` and names with
//! `--provider-opt aws.price_table=FILE`.
//!
//! The table is CSV: `instance_type,usd_per_hour[,region]` after a header line of those names,
//! with a `# as-of: YYYY-MM-DD` comment saying when the prices are from. A row without a
//! region prices that type in every region (the bundled table's us-east-1 list prices, an
//! estimate elsewhere); a row with one, only there.

use std::collections::HashMap;
use std::path::Path;

/// The table bundled with this build.
const BUNDLED: &str = include_str!("../data/aws-on-demand-prices.csv");

/// A price table larger than this is not one (AWS's whole price list, say).
const MAX_TABLE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    /// When the prices are from, as the table says (`YYYY-MM-DD`).
    pub as_of: String,
    /// Where it was read from: `bundled`, or the file's path.
    pub source: String,
    /// USD per hour by (instance type, region); region `None` applies everywhere.
    prices: HashMap<(String, Option<String>), f64>,
}

impl PriceTable {
    /// The table bundled with this build.
    pub fn bundled() -> PriceTable {
        PriceTable::parse(BUNDLED, "bundled").expect("the bundled price table parses")
    }

    /// Reads a table from `path`; errors are one line naming the file and the fix.
    pub fn load(path: &Path) -> Result<PriceTable, String> {
        let shown = path.display();
        let size = std::fs::metadata(path)
            .map_err(|e| format!("aws price table {shown}: {e}"))?
            .len();
        if size > MAX_TABLE_BYTES {
            return Err(format!(
                "aws price table {shown} is {size} bytes, more than {MAX_TABLE_BYTES}: make one with scripts/aws-prices.py from AWS's price list"
            ));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("aws price table {shown}: {e}"))?;
        PriceTable::parse(&text, &shown.to_string())
    }

    /// Parses a table's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<PriceTable, String> {
        let fail = |line: usize, why: String| {
            Err(format!(
                "aws price table {source}, line {line}: {why}; rows are instance_type,usd_per_hour[,region] (scripts/aws-prices.py writes such a table)"
            ))
        };
        let mut as_of = None;
        let mut prices = HashMap::new();
        let mut header = false;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if let Some(comment) = line.strip_prefix('#') {
                if let Some(date) = comment.trim().strip_prefix("as-of:") {
                    let date = date.trim();
                    if !is_date(date) {
                        return fail(number, format!("as-of {date:?} is not a date YYYY-MM-DD"));
                    }
                    as_of = Some(date.to_string());
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if !header {
                if fields[..2.min(fields.len())] != ["instance_type", "usd_per_hour"] {
                    return fail(number, "the first row must be the header".into());
                }
                header = true;
                continue;
            }
            let (kind, price, region) = match fields[..] {
                [kind, price] => (kind, price, None),
                [kind, price, region] => (kind, price, Some(region)),
                _ => return fail(number, format!("{} fields", fields.len())),
            };
            let valid_name = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            };
            if !valid_name(kind) || region.is_some_and(|r| !valid_name(r)) {
                return fail(number, format!("{line:?} is not a type and a region"));
            }
            let price: f64 = match price.parse() {
                Ok(p) if f64::is_finite(p) && p >= 0.0 => p,
                _ => {
                    return fail(
                        number,
                        format!("price {price:?} is not a number of dollars"),
                    )
                }
            };
            prices.insert((kind.to_string(), region.map(str::to_string)), price);
        }
        let Some(as_of) = as_of else {
            return fail(
                text.lines().count(),
                "no `# as-of: YYYY-MM-DD` line saying when the prices are from".into(),
            );
        };
        if prices.is_empty() {
            return fail(text.lines().count(), "no prices".into());
        }
        Ok(PriceTable {
            as_of,
            source: source.to_string(),
            prices,
        })
    }

    /// The on-demand price of `instance_type` in `region`: the region's own row, else a row
    /// for every region.
    pub fn price(&self, instance_type: &str, region: &str) -> Option<f64> {
        let key = |region: Option<&str>| (instance_type.to_string(), region.map(str::to_string));
        self.prices
            .get(&key(Some(region)))
            .or_else(|| self.prices.get(&key(None)))
            .copied()
    }

    /// How many prices it holds.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

fn is_date(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    matches!(parts[..], [y, m, d] if y.len() == 4 && m.len() == 2 && d.len() == 2)
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_table_is_dated_and_prices_gpu_types() {
        let table = PriceTable::bundled();
        assert!(table.len() > 30);
        assert!(is_date(&table.as_of), "{}", table.as_of);
        assert_eq!(table.price("g5.xlarge", "us-east-1"), Some(1.006));
        assert_eq!(table.price("g5.xlarge", "eu-west-1"), Some(1.006));
        assert_eq!(table.price("no.such", "us-east-1"), None);
    }

    #[test]
    fn a_regional_row_wins_in_its_region_only() {
        let table = PriceTable::parse(
            "# as-of: 2026-11-01\ninstance_type,usd_per_hour,region\np5.48xlarge,98.32\np5.48xlarge,55.04,us-east-1\n",
            "test",
        )
        .unwrap();
        assert_eq!(table.as_of, "2026-11-01");
        assert_eq!(table.price("p5.48xlarge", "us-east-1"), Some(55.04));
        assert_eq!(table.price("p5.48xlarge", "eu-west-1"), Some(98.32));
    }

    #[test]
    fn bad_tables_are_refused_in_one_line_naming_the_line_and_the_fix() {
        for (text, why) in [
            ("instance_type,usd_per_hour\nt3.micro,0.01\n", "no `# as-of"),
            ("# as-of: June\ninstance_type,usd_per_hour\n", "not a date"),
            ("# as-of: 2026-11-01\nt3.micro,0.01\n", "header"),
            (
                "# as-of: 2026-11-01\ninstance_type,usd_per_hour\nt3.micro,cheap\n",
                "line 3",
            ),
            (
                "# as-of: 2026-11-01\ninstance_type,usd_per_hour\nt3.micro,-1\n",
                "not a number",
            ),
            (
                "# as-of: 2026-11-01\ninstance_type,usd_per_hour\nt3.micro,1,us-east-1,x\n",
                "4 fields",
            ),
            (
                "# as-of: 2026-11-01\ninstance_type,usd_per_hour\nt3 micro,1\n",
                "not a type",
            ),
            (
                "# as-of: 2026-11-01\ninstance_type,usd_per_hour\n",
                "no prices",
            ),
        ] {
            let error = PriceTable::parse(text, "prices.csv").unwrap_err();
            assert!(error.contains(why), "{text:?}: {error}");
            assert!(error.contains("prices.csv") && error.contains("scripts/aws-prices.py"));
            assert!(!error.contains('\n'), "{error}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = PriceTable::load(Path::new("/nonexistent/prices.csv")).unwrap_err();
        assert!(error.contains("/nonexistent/prices.csv"), "{error}");
    }
}
