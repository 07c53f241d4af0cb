//! Contract checks against a vendor's OpenAPI 3.0 document: every request a client sends to
//! a stand-in and every answer the stand-in gives are checked against the operation they
//! belong to (parameters, request body, status, response body), so that neither our
//! client nor our stand-in can drift from the real API's shapes unnoticed.
//!
//! Schemas are turned into JSON Schema 2020-12 before validation: `$ref`s are inlined,
//! `nullable: true` becomes "or null", and request bodies are closed
//! (`unevaluatedProperties: false`) so that a misspelt field is an error, not an extra.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Map, Value};

/// How deep `$ref`s may nest while inlining (the operations checked here need far less).
const MAX_REF_DEPTH: usize = 48;
/// Errors reported per check.
const MAX_ERRORS: usize = 8;

pub struct OpenApi {
    doc: Value,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

/// The official DigitalOcean spec, vendored as `tests/fixtures/specs/digitalocean-openapi.v2.yaml`
/// (its source and licence beside it), loaded once per test binary.
pub fn digitalocean() -> &'static OpenApi {
    static SPEC: OnceLock<OpenApi> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = vendored_spec("digitalocean-openapi.v2.yaml");
        OpenApi::load(&path).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// `tests/fixtures/specs/<name>`: the vendors' specs the contract checks read.
pub fn vendored_spec(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/specs")
        .join(name)
}

impl OpenApi {
    pub fn load(path: &Path) -> Result<OpenApi, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "{}: {e}: the contract checks need the vendor's OpenAPI spec vendored in tests/fixtures/specs",
                path.display()
            )
        })?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(yaml: &str) -> Result<OpenApi, String> {
        let yaml = widen_huge_integers(yaml);
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&yaml).map_err(|e| format!("not YAML: {e}"))?;
        let doc = yaml_to_json(value);
        if doc.get("paths").and_then(Value::as_object).is_none() {
            return Err("no `paths` in the document: not an OpenAPI spec".into());
        }
        Ok(OpenApi {
            doc,
            validators: Mutex::new(HashMap::new()),
        })
    }

    /// The operation for `method` on a concrete `path`, with its path template and the
    /// path parameters' values. Literal segments win over templated ones.
    fn operation(&self, method: &str, path: &str) -> Result<Operation<'_>, String> {
        let method = method.to_ascii_lowercase();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let paths = self.doc["paths"].as_object().expect("checked at load");
        let mut best: Option<PathMatch<'_>> = None;
        for template in paths.keys() {
            let parts: Vec<&str> = template.trim_end_matches('/').split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut literal = 0;
            let mut params = Vec::new();
            let matched = parts.iter().zip(&segments).all(|(part, seg)| {
                if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    params.push((name.to_string(), seg.to_string()));
                    !seg.is_empty()
                } else {
                    literal += 1;
                    part == seg
                }
            });
            if matched && best.as_ref().is_none_or(|(l, _, _)| literal > *l) {
                best = Some((literal, template, params));
            }
        }
        let (_, template, path_params) =
            best.ok_or_else(|| format!("{path} is no path of the API"))?;
        let item = &paths[template];
        let op = item.get(&method).ok_or_else(|| {
            format!(
                "{} {template} is no operation of the API",
                method.to_uppercase()
            )
        })?;
        Ok(Operation {
            template: template.to_string(),
            id: op["operationId"].as_str().unwrap_or(template).to_string(),
            item,
            op,
            path_params,
        })
    }

    /// Checks a request: its path and query parameters (declared, required, typed) and its
    /// JSON body. Returns every violation found.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Vec<String> {
        let op = match self.operation(method, path) {
            Ok(op) => op,
            Err(e) => return vec![e],
        };
        let at = format!("{method} {}", op.template);
        let mut violations = Vec::new();
        let mut declared = Vec::new();
        let params = op
            .item
            .get("parameters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .chain(
                op.op
                    .get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            );
        for param in params {
            let param = match self.deref(param) {
                Ok(p) => p,
                Err(e) => {
                    violations.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let name = param["name"].as_str().unwrap_or_default();
            let location = param["in"].as_str().unwrap_or_default();
            let required = param["required"].as_bool().unwrap_or(location == "path");
            let values: Vec<&String> = match location {
                "query" => {
                    declared.push(name.to_string());
                    query
                        .iter()
                        .filter(|(k, _)| k == name)
                        .map(|(_, v)| v)
                        .collect()
                }
                "path" => op
                    .path_params
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v)
                    .collect(),
                _ => continue,
            };
            if values.is_empty() && required {
                violations.push(format!(
                    "{at}: required {location} parameter {name} missing"
                ));
            }
            if values.len() > 1 {
                violations.push(format!(
                    "{at}: {location} parameter {name} given {} times",
                    values.len()
                ));
            }
            let Some(schema) = param.get("schema") else {
                continue;
            };
            for value in values {
                let typed = coerce(value, schema, &self.doc);
                let key = format!("param {} {location} {name}", op.id);
                for e in self.validate(&key, schema, false, &typed) {
                    violations.push(format!("{at}: {location} parameter {name}={value:?}: {e}"));
                }
            }
        }
        for (name, _) in query {
            if !declared.contains(name) {
                violations.push(format!("{at}: query parameter {name} is not declared"));
            }
        }
        let body_schema = op
            .op
            .get("requestBody")
            .and_then(|b| self.deref(b).ok())
            .and_then(|b| b.pointer("/content/application~1json/schema").cloned());
        match (body_schema, body) {
            (Some(schema), Some(body)) => {
                let key = format!("request {}", op.id);
                for e in self.validate(&key, &schema, true, body) {
                    violations.push(format!("{at}: request body: {e}"));
                }
            }
            (None, Some(_)) => violations.push(format!("{at}: takes no JSON body")),
            (Some(_), None) => violations.push(format!("{at}: JSON body missing")),
            (None, None) => {}
        }
        violations
    }

    /// Checks an answer: its status is one the operation declares (or `default`), its body
    /// is what that response declares (JSON of the schema, or nothing), and its declared
    /// integer headers, where present, are integers.
    pub fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Vec<String> {
        let op = match self.operation(method, path) {
            Ok(op) => op,
            Err(e) => return vec![e],
        };
        let at = format!("{method} {} -> {status}", op.template);
        let responses = &op.op["responses"];
        let Some(response) = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
        else {
            return vec![format!("{at}: status not declared (and no default)")];
        };
        let response = match self.deref(response) {
            Ok(r) => r,
            Err(e) => return vec![format!("{at}: {e}")],
        };
        let mut violations = Vec::new();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if let Some(declared) = response.get("headers").and_then(Value::as_object) {
            for (name, spec) in declared {
                let spec = self.deref(spec).unwrap_or(Value::Null);
                let integer =
                    spec.pointer("/schema/type").and_then(Value::as_str) == Some("integer");
                if let (true, Some(value)) = (integer, header(name)) {
                    if value.trim().parse::<i64>().is_err() {
                        violations
                            .push(format!("{at}: header {name}: {value:?} is not an integer"));
                    }
                }
            }
        }
        match response.pointer("/content/application~1json/schema") {
            Some(schema) => {
                if !header("content-type").is_some_and(|t| t.starts_with("application/json")) {
                    violations.push(format!("{at}: content-type is not application/json"));
                }
                match serde_json::from_slice::<Value>(body) {
                    Ok(value) => {
                        let key = format!("response {} {status}", op.id);
                        for e in self.validate(&key, schema, false, &value) {
                            violations.push(format!("{at}: {e}"));
                        }
                    }
                    Err(e) => violations.push(format!("{at}: body is not JSON: {e}")),
                }
            }
            None if !body.is_empty() => violations.push(format!(
                "{at}: declares no body but {} bytes came",
                body.len()
            )),
            None => {}
        }
        violations
    }

    /// Validates `instance` against an OpenAPI schema; the compiled validator is cached
    /// under `key`.
    fn validate(&self, key: &str, schema: &Value, closed: bool, instance: &Value) -> Vec<String> {
        let cached = self
            .validators
            .lock()
            .expect("validators")
            .get(key)
            .cloned();
        let validator = match cached {
            Some(v) => v,
            None => {
                let mut converted = match self.convert(schema, 0) {
                    Ok(s) => s,
                    Err(e) => return vec![format!("schema: {e}")],
                };
                if closed {
                    close(&mut converted);
                }
                let built = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .should_validate_formats(true)
                    .build(&converted);
                match built {
                    Ok(v) => {
                        let v = Arc::new(v);
                        self.validators
                            .lock()
                            .expect("validators")
                            .insert(key.to_string(), v.clone());
                        v
                    }
                    Err(e) => return vec![format!("schema does not compile: {e}")],
                }
            }
        };
        validator
            .iter_errors(instance)
            .take(MAX_ERRORS)
            .map(|e| {
                let path = e.instance_path().to_string();
                format!("{}: {e}", if path.is_empty() { "/" } else { &path })
            })
            .collect()
    }

    /// Follows a `$ref` (if `value` is one) within the document.
    fn deref(&self, value: &Value) -> Result<Value, String> {
        let mut value = value.clone();
        for _ in 0..MAX_REF_DEPTH {
            match value.get("$ref").and_then(Value::as_str) {
                Some(reference) => value = self.target(reference)?.clone(),
                None => return Ok(value),
            }
        }
        Err("$ref chain too long".into())
    }

    fn target(&self, reference: &str) -> Result<&Value, String> {
        let pointer = reference
            .strip_prefix('#')
            .ok_or_else(|| format!("external $ref {reference} is not supported"))?;
        self.doc
            .pointer(pointer)
            .ok_or_else(|| format!("$ref {reference} points nowhere"))
    }

    /// An OpenAPI 3.0 schema as JSON Schema 2020-12, `$ref`s inlined.
    fn convert(&self, schema: &Value, depth: usize) -> Result<Value, String> {
        if depth > MAX_REF_DEPTH {
            return Err("schema nests too deep (a recursive $ref?)".into());
        }
        let Some(object) = schema.as_object() else {
            return Ok(schema.clone());
        };
        if let Some(reference) = object.get("$ref").and_then(Value::as_str) {
            // In OpenAPI 3.0, whatever stands beside a $ref is ignored.
            return self.convert(self.target(reference)?, depth + 1);
        }
        let mut out = Map::new();
        for (key, value) in object {
            let converted = match key.as_str() {
                "properties" | "patternProperties" => {
                    let mut props = Map::new();
                    for (name, sub) in value.as_object().into_iter().flatten() {
                        props.insert(name.clone(), self.convert(sub, depth + 1)?);
                    }
                    Value::Object(props)
                }
                "items" | "not" | "additionalProperties" if value.is_object() => {
                    self.convert(value, depth + 1)?
                }
                "allOf" | "anyOf" | "oneOf" => Value::Array(
                    value
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|sub| self.convert(sub, depth + 1))
                        .collect::<Result<_, _>>()?,
                ),
                // Annotations JSON Schema does not know, and OpenAPI's own keywords.
                "nullable" | "example" | "examples" | "discriminator" | "xml" | "externalDocs"
                | "readOnly" | "writeOnly" | "deprecated" => continue,
                k if k.starts_with("x-") => continue,
                _ => value.clone(),
            };
            out.insert(key.clone(), converted);
        }
        let converted = Value::Object(out);
        if object.get("nullable").and_then(Value::as_bool) == Some(true) {
            Ok(json!({"anyOf": [{"type": "null"}, converted]}))
        } else {
            Ok(converted)
        }
    }
}

/// A path template that matches: its literal segment count, itself, its parameters.
type PathMatch<'a> = (usize, &'a str, Vec<(String, String)>);

struct Operation<'a> {
    template: String,
    id: String,
    item: &'a Value,
    op: &'a Value,
    path_params: Vec<(String, String)>,
}

/// A query or path value typed by its schema, so that `per_page=500` is checked as 500.
fn coerce(value: &str, schema: &Value, doc: &Value) -> Value {
    let mut schema = schema;
    for _ in 0..MAX_REF_DEPTH {
        match schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|p| doc.pointer(p))
        {
            Some(target) => schema = target,
            None => break,
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("integer") => value
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.into())),
        Some("number") => value
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.into())),
        Some("boolean") => match value {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            other => Value::String(other.into()),
        },
        _ => Value::String(value.into()),
    }
}

/// Closes a request schema: a property no branch declares is an error.
fn close(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    for key in ["oneOf", "anyOf"] {
        if let Some(branches) = object.get_mut(key).and_then(Value::as_array_mut) {
            for branch in branches {
                close(branch);
            }
            return;
        }
    }
    if object.contains_key("properties") || object.contains_key("allOf") {
        object.insert("unevaluatedProperties".into(), Value::Bool(false));
    }
}

/// `key: 18446744073709552000` (past u64: the DigitalOcean spec has one) as a float, which
/// the YAML parser takes; every other line stays as it is.
fn widen_huge_integers(yaml: &str) -> std::borrow::Cow<'_, str> {
    let huge = |line: &str| {
        line.rsplit_once(": ").is_some_and(|(_, value)| {
            let digits = value.trim().trim_start_matches('-');
            digits.len() > 18
                && digits.bytes().all(|b| b.is_ascii_digit())
                && value.trim().parse::<i64>().is_err()
                && value.trim().parse::<u64>().is_err()
        })
    };
    if !yaml.lines().any(huge) {
        return std::borrow::Cow::Borrowed(yaml);
    }
    let mut out = String::with_capacity(yaml.len() + 16);
    for line in yaml.lines() {
        out.push_str(line);
        if huge(line) {
            out.push_str(".0");
        }
        out.push('\n');
    }
    std::borrow::Cow::Owned(out)
}

fn yaml_to_json(value: serde_yaml_ng::Value) -> Value {
    use serde_yaml_ng::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        other => match yaml_to_json(other) {
                            Value::String(s) => s,
                            v => v.to_string(),
                        },
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(tagged) => yaml_to_json(tagged.value),
    }
}
