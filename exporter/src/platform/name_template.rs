//! The workload name of a container, from a template over what the runtime says of it.
//!
//! A template is text with placeholders in braces; a placeholder lists fields separated by
//! `|`, and takes the first that is set and not empty:
//! - `name`: the container's name (Docker's, without the leading `/`);
//! - `id`: the first 12 characters of its id;
//! - `label:KEY`: the value of its label `KEY`;
//! - `namespace`: on Kubernetes the pod's namespace, on Docker the Compose project;
//! - `owner` and `owner_kind`: on Kubernetes the workload that owns the pod as its labels tell
//!   ([`kubernetes_owner`](super::kubernetes_owner)), or the pod itself; on Docker `owner` is
//!   empty and `owner_kind` is `ComposeService` or `Container`.
//!
//! The name is one field of the container's identity ([`WorkloadIdentity`]); the namespace, the
//! pod or container name and the owner kind travel beside it as fields of their own.
//!
//! Docker's default, `{label:com.docker.compose.service|name}`, names a Compose service's
//! replicas alike and any other container by its name. Kubernetes' default,
//! `{namespace}/{owner}`, names every replica of a Deployment, StatefulSet, DaemonSet, Job or
//! CronJob alike.

use std::collections::BTreeMap;

use flowattr_common::{
    IDENTITY_FIELD_BYTES_MAX, WorkloadIdentity, check_identifier, check_workload_name,
};

pub const DOCKER_DEFAULT: &str = "{label:com.docker.compose.service|name}";
pub const KUBERNETES_DEFAULT: &str = "{namespace}/{owner}";

#[derive(Debug, thiserror::Error)]
#[error("name template `{template}`: {reason}")]
pub struct TemplateError {
    template: String,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// Alternatives, the first set one taken.
    Field(Vec<Field>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Id,
    Label(String),
    Namespace,
    Owner,
    OwnerKind,
}

/// What a template is filled from: a Docker container, or a Kubernetes pod (whose `name` is
/// the pod's).
pub struct ContainerFields<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// The Kubernetes namespace, or the Compose project (empty for other containers).
    pub namespace: &'a str,
    pub owner: &'a str,
    pub owner_kind: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    parts: Vec<Part>,
}

impl NameTemplate {
    pub fn parse(template: &str) -> Result<NameTemplate, TemplateError> {
        let error = |reason: &str| TemplateError {
            template: template.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                if rest.contains('}') {
                    return Err(error("a `}` without its `{`"));
                }
                parts.push(Part::Text(rest.to_owned()));
                break;
            };
            if rest[..open].contains('}') {
                return Err(error("a `}` without its `{`"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| error("a `{` without its `}`"))?
                + open;
            let mut fields = Vec::new();
            for field in rest[open + 1..close].split('|') {
                fields.push(match field.trim() {
                    "name" => Field::Name,
                    "id" => Field::Id,
                    "namespace" => Field::Namespace,
                    "owner" => Field::Owner,
                    "owner_kind" => Field::OwnerKind,
                    other => match other.strip_prefix("label:") {
                        Some(key) if !key.is_empty() => Field::Label(key.to_owned()),
                        _ => return Err(error(&format!("unknown field `{other}` (name, id, label:KEY, namespace, owner or owner_kind)"))),
                    },
                });
            }
            parts.push(Part::Field(fields));
            rest = &rest[close + 1..];
        }
        if !parts.iter().any(|part| matches!(part, Part::Field(_))) {
            return Err(error("no field: every container would get the same name"));
        }
        Ok(NameTemplate { parts })
    }

    /// The container's identity key: the name [`Self::render`] makes, and the namespace, the
    /// container's own name (the instance) and the owner kind beside it. A field that breaks
    /// the identity rule is left out.
    pub fn identity(&self, fields: &ContainerFields<'_>) -> (String, Option<String>) {
        let (name, problem) = self.render(fields);
        fn field(value: &str) -> &str {
            if check_identifier(value, IDENTITY_FIELD_BYTES_MAX).is_ok() {
                value
            } else {
                ""
            }
        }
        let identity = WorkloadIdentity {
            name: &name,
            namespace: field(fields.namespace),
            instance: field(fields.name),
            owner_kind: field(fields.owner_kind),
        };
        (identity.key(), problem)
    }

    /// The container's workload name; if the template makes an empty or unusable name, the
    /// container's own name (with why, for a warning).
    pub fn render(&self, fields: &ContainerFields<'_>) -> (String, Option<String>) {
        let mut name = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => name.push_str(text),
                Part::Field(alternatives) => {
                    let value = alternatives.iter().find_map(|field| {
                        let value = match field {
                            Field::Name => fields.name,
                            Field::Id => &fields.id[..fields.id.len().min(12)],
                            Field::Label(key) => fields.labels.get(key).map_or("", String::as_str),
                            Field::Namespace => fields.namespace,
                            Field::Owner => fields.owner,
                            Field::OwnerKind => fields.owner_kind,
                        };
                        (!value.is_empty()).then_some(value)
                    });
                    name.push_str(value.unwrap_or(""));
                }
            }
        }
        match check_workload_name(&name) {
            Ok(()) if !name.is_empty() => (name, None),
            Ok(()) => (
                fields.name.to_owned(),
                Some("the template made an empty name".into()),
            ),
            Err(problem) => (
                fields.name.to_owned(),
                Some(format!("the template made a name that {problem}")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_fall_back_in_order_and_text_stays() {
        let none = BTreeMap::new();
        let fields = |labels| ContainerFields {
            name: "web-1",
            id: "0123456789abcdef",
            labels,
            namespace: "",
            owner: "",
            owner_kind: "",
        };
        let default = NameTemplate::parse(DOCKER_DEFAULT).unwrap();
        assert_eq!(default.render(&fields(&none)), ("web-1".into(), None));
        let labels = BTreeMap::from([
            ("com.docker.compose.service".to_owned(), "web".to_owned()),
            ("team".to_owned(), "payments".to_owned()),
        ]);
        let fields = fields(&labels);
        assert_eq!(default.render(&fields).0, "web");
        let template = NameTemplate::parse("{label:team}/{label:missing|id}").unwrap();
        assert_eq!(template.render(&fields).0, "payments/0123456789ab");
    }

    #[test]
    fn kubernetes_default_names_the_owner_in_its_namespace() {
        let labels = BTreeMap::new();
        let pod = ContainerFields {
            name: "api-7d9f8b6c5d-x2x9q",
            id: "5f1c0ffee",
            labels: &labels,
            namespace: "shop",
            owner: "api",
            owner_kind: "Deployment",
        };
        assert_eq!(
            NameTemplate::parse(KUBERNETES_DEFAULT)
                .unwrap()
                .render(&pod)
                .0,
            "shop/api"
        );
        let (key, _) = NameTemplate::parse(KUBERNETES_DEFAULT)
            .unwrap()
            .identity(&pod);
        assert_eq!(
            WorkloadIdentity::parse(&key),
            Ok(WorkloadIdentity {
                name: "shop/api",
                namespace: "shop",
                instance: "api-7d9f8b6c5d-x2x9q",
                owner_kind: "Deployment",
            })
        );
        assert_eq!(
            NameTemplate::parse("{owner_kind}:{name}")
                .unwrap()
                .render(&pod)
                .0,
            "Deployment:api-7d9f8b6c5d-x2x9q"
        );
    }

    #[test]
    fn bad_templates_are_refused_and_bad_names_fall_back() {
        for (template, reason) in [
            ("{nme}", "unknown field `nme`"),
            ("{name", "without its `}`"),
            ("x}", "without its `{`"),
            ("fixed", "no field"),
            ("{label:}", "unknown field"),
        ] {
            let error = NameTemplate::parse(template).unwrap_err().to_string();
            assert!(error.contains(reason), "{template}: {error}");
        }
        let labels = BTreeMap::from([("bad".to_owned(), "a\tb".to_owned())]);
        let fields = ContainerFields {
            name: "web-1",
            id: "0123",
            labels: &labels,
            namespace: "",
            owner: "",
            owner_kind: "",
        };
        let (name, why) = NameTemplate::parse("{label:bad}").unwrap().render(&fields);
        assert_eq!(name, "web-1");
        assert!(why.unwrap().contains("control character"));
        let (name, why) = NameTemplate::parse("{label:absent}")
            .unwrap()
            .render(&fields);
        assert_eq!((name.as_str(), why.is_some()), ("web-1", true));
    }
}
