//! Which handler an event goes to: the first `[[route]]` whose source matches
//! and whose `event_types` globs match the event's type. The database applies
//! the routes when it claims (so pauses, limits and circuits can be decided
//! there); this is the table it is given.

use crate::config::RouteSection;

/// The routes as the claim statement takes them: one row per glob, the
/// route's position first, `None` for a route that matches every type.
#[derive(Debug, Default, PartialEq)]
pub struct RouteTable {
    pub positions: Vec<i32>,
    pub sources: Vec<String>,
    pub patterns: Vec<Option<String>>,
    pub handlers: Vec<String>,
}

impl RouteTable {
    pub fn new(sections: &[RouteSection]) -> Self {
        let mut table = Self::default();
        for (position, section) in sections.iter().enumerate() {
            let patterns = match &section.event_types {
                None => vec![None],
                Some(globs) => globs
                    .iter()
                    .map(|g| Some(crate::glob::to_like(g)))
                    .collect(),
            };
            for pattern in patterns {
                table.positions.push(position as i32);
                table.sources.push(section.source.clone());
                table.patterns.push(pattern);
                table.handlers.push(section.handler.clone());
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(source: &str, types: Option<&[&str]>, handler: &str) -> RouteSection {
        RouteSection {
            source: source.into(),
            event_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
            handler: handler.into(),
        }
    }

    #[test]
    fn each_glob_is_a_row_that_keeps_its_routes_position() {
        let table = RouteTable::new(&[
            route(
                "begini",
                Some(&["psychometric_score.*", "*_score.complete"]),
                "scores",
            ),
            route("begini", None, "everything"),
        ]);
        assert_eq!(table.positions, [0, 0, 1]);
        assert_eq!(
            table.patterns,
            [
                Some("psychometric\\_score.%".to_owned()),
                Some("%\\_score.complete".to_owned()),
                None
            ]
        );
        assert_eq!(table.handlers, ["scores", "scores", "everything"]);
    }
}
