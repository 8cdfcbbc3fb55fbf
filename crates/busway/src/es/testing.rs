//! Given / when / then tests for aggregates, without a store or a broker.

use std::fmt::Debug;

use super::aggregate::Aggregate;

/// Tests an aggregate's decisions: given past events, when a command is
/// handled, then these events (or this error) result.
///
/// ```
/// # use busway::es::Aggregate;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Default, Serialize, Deserialize)]
/// # struct Counter { value: u64 }
/// # #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// # #[serde(tag = "type", content = "data")]
/// # enum CounterEvent { #[serde(rename = "counter.added")] Added { by: u64 } }
/// # #[derive(Debug, PartialEq, thiserror::Error)]
/// # #[error("cannot add zero")]
/// # struct AddZero;
/// # impl Aggregate for Counter {
/// #     const TYPE: &'static str = "counter";
/// #     type Command = u64;
/// #     type Event = CounterEvent;
/// #     type Error = AddZero;
/// #     fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, AddZero> {
/// #         if by == 0 { return Err(AddZero); }
/// #         Ok(vec![CounterEvent::Added { by }])
/// #     }
/// #     fn apply(&mut self, event: &CounterEvent) {
/// #         match event { CounterEvent::Added { by } => self.value += by }
/// #     }
/// # }
/// use busway::es::TestFramework;
///
/// TestFramework::<Counter>::given(vec![CounterEvent::Added { by: 1 }])
///     .when(2)
///     .then_expect_events(vec![CounterEvent::Added { by: 2 }]);
/// TestFramework::<Counter>::given_no_previous_events()
///     .when(0)
///     .then_expect_error(AddZero);
/// ```
#[derive(Debug)]
pub struct TestFramework<A: Aggregate> {
    state: A,
}

/// The outcome of [`TestFramework::when`], to check.
#[derive(Debug)]
pub struct Then<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> TestFramework<A> {
    /// An aggregate that has recorded `events`.
    pub fn given(events: Vec<A::Event>) -> Self {
        let mut state = A::default();
        for event in &events {
            state.apply(event);
        }
        Self { state }
    }
    /// A new aggregate.
    pub fn given_no_previous_events() -> Self {
        Self::given(Vec::new())
    }
    /// Handles `command`.
    pub fn when(self, command: A::Command) -> Then<A> {
        let result = self.state.handle(command);
        Then {
            state: self.state,
            result,
        }
    }
}

impl<A: Aggregate> Then<A>
where
    A::Event: PartialEq + Debug,
    A::Error: Debug,
{
    /// Panics unless the command produced exactly `expected`.
    #[track_caller]
    pub fn then_expect_events(self, expected: Vec<A::Event>) {
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the command produced other events"),
            Err(e) => panic!("expected events {expected:?}, the command failed: {e:?}"),
        }
    }
    /// Panics unless the command failed with `expected`.
    #[track_caller]
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, the command produced {events:?}"),
            Err(e) => assert_eq!(e, expected, "the command failed otherwise"),
        }
    }
    /// Panics unless the command failed with an error whose message is `message`.
    #[track_caller]
    pub fn then_expect_error_message(self, message: &str) {
        match self.result {
            Ok(events) => panic!("expected error `{message}`, the command produced {events:?}"),
            Err(e) => assert_eq!(e.to_string(), message),
        }
    }
    /// The state after applying the produced events (panics if the command failed), to inspect.
    #[track_caller]
    pub fn state(self) -> A {
        let mut state = self.state;
        match self.result {
            Ok(events) => {
                for event in &events {
                    state.apply(event);
                }
                state
            }
            Err(e) => panic!("the command failed: {e:?}"),
        }
    }
    /// The raw result.
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}
