//! Queues and bindings: declared in `busway_queues` and `busway_bindings`;
//! specs are cached (a declared spec never changes), bindings are not (the
//! publish routes with one query, so bindings made by other processes count
//! at once).

use busway_core::{Binding, DeclareError, QueueName, QueueSpec, TopicPattern};
use sqlx::{PgConnection, Row};

use crate::error::Fail;
use crate::transport::Shared;

impl Shared {
    /// The cached spec of `queue`.
    pub(crate) fn cached_spec(&self, queue: &QueueName) -> Option<QueueSpec> {
        crate::transport::lock(&self.specs).get(queue).cloned()
    }

    /// Loads the specs of `queues` that are not cached yet; the ones that
    /// do not exist stay missing.
    pub(crate) async fn load_specs(
        &self,
        conn: &mut PgConnection,
        queues: &[&QueueName],
    ) -> Result<(), sqlx::Error> {
        let missing: Vec<&str> = {
            let specs = crate::transport::lock(&self.specs);
            queues
                .iter()
                .filter(|q| !specs.contains_key(**q))
                .map(|q| q.as_str())
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query("SELECT name, spec FROM busway_queues WHERE name = ANY($1)")
            .bind(&missing)
            .fetch_all(&mut *conn)
            .await?;
        let mut specs = crate::transport::lock(&self.specs);
        for row in rows {
            let json: String = row.try_get("spec")?;
            let spec: QueueSpec =
                serde_json::from_str(&json).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            specs.insert(spec.name.clone(), spec);
        }
        Ok(())
    }

    /// The spec of `queue`, from the cache or the database.
    pub(crate) async fn spec(
        &self,
        conn: &mut PgConnection,
        queue: &QueueName,
    ) -> Result<Option<QueueSpec>, sqlx::Error> {
        if let Some(spec) = self.cached_spec(queue) {
            return Ok(Some(spec));
        }
        self.load_specs(conn, &[queue]).await?;
        Ok(self.cached_spec(queue))
    }

    /// Inserts `spec` unless its queue exists; returns the spec the queue has.
    async fn insert_spec(
        &self,
        conn: &mut PgConnection,
        spec: &QueueSpec,
    ) -> Result<QueueSpec, Fail<DeclareError>> {
        let json = serde_json::to_string(spec).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let inserted = sqlx::query(
            "INSERT INTO busway_queues (name, spec) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(spec.name.as_str())
        .bind(&json)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 1 {
            crate::transport::lock(&self.specs).insert(spec.name.clone(), spec.clone());
            return Ok(spec.clone());
        }
        match self.spec(conn, &spec.name).await? {
            Some(existing) => Ok(existing),
            // Deleted meanwhile by hand: report it as a failure to retry.
            None => Err(Fail::Op(DeclareError::Backend {
                source: format!("queue `{}` vanished while being declared", spec.name).into(),
                retryable: true,
            })),
        }
    }

    pub(crate) async fn declare(
        &self,
        conn: &mut PgConnection,
        spec: &QueueSpec,
    ) -> Result<(), Fail<DeclareError>> {
        spec.validate()?;
        let existing = self.insert_spec(conn, spec).await?;
        existing.check_redeclare(spec)?;
        if let Some(dead_letter) = spec.dead_letter_spec() {
            // An existing dead-letter queue is accepted whatever its spec.
            self.insert_spec(conn, &dead_letter).await?;
        }
        Ok(())
    }

    pub(crate) async fn bind(
        &self,
        conn: &mut PgConnection,
        binding: &Binding,
    ) -> Result<(), Fail<DeclareError>> {
        if self.spec(conn, &binding.queue).await?.is_none() {
            return Err(DeclareError::QueueNotFound(binding.queue.clone()).into());
        }
        sqlx::query(
            "INSERT INTO busway_bindings (queue, pattern, regex) VALUES ($1, $2, $3) \
             ON CONFLICT (queue, pattern) DO NOTHING",
        )
        .bind(binding.queue.as_str())
        .bind(binding.pattern.as_str())
        .bind(pattern_regex(&binding.pattern))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// A PostgreSQL regular expression matching `'.' || topic` exactly when
/// `pattern` matches `topic` (AMQP topic semantics: `*` is one word, `#`
/// zero or more). Each word of the topic is read with the dot before it, so
/// `#` can match no word at all.
pub(crate) fn pattern_regex(pattern: &TopicPattern) -> String {
    let mut regex = String::from("^");
    for word in pattern.as_str().split('.') {
        match word {
            "*" => regex.push_str(r"\.[^.]+"),
            "#" => regex.push_str(r"(\.[^.]+)*"),
            literal => {
                regex.push_str(r"\.");
                for c in literal.chars() {
                    if !c.is_ascii_alphanumeric() {
                        regex.push('\\');
                    }
                    regex.push(c);
                }
            }
        }
    }
    regex.push('$');
    regex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_become_anchored_regexes() -> Result<(), busway_core::NameError> {
        let cases = [
            ("order.created", r"^\.order\.created$"),
            ("order.*", r"^\.order\.[^.]+$"),
            ("order.#", r"^\.order(\.[^.]+)*$"),
            ("#", r"^(\.[^.]+)*$"),
            ("a-b.#.c_d", r"^\.a\-b(\.[^.]+)*\.c\_d$"),
        ];
        for (pattern, regex) in cases {
            assert_eq!(
                pattern_regex(&TopicPattern::new(pattern)?),
                regex,
                "{pattern}"
            );
        }
        Ok(())
    }
}
