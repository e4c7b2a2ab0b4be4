//! Declaring a service's collectors: each is registered, and its known
//! series created, where it is made, so that no second list of the
//! collectors can fall out of step with the first.
//!
//! ```ignore
//! let writes = IntCounterVec::new(Opts::new(name, help), &["result"])?
//!     .register(registry)?
//!     .with_series(["ok", "error"]);
//! ```

use prometheus::Registry;
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

/// A collector that registers itself.
pub trait Register: Collector + Clone + Sized + 'static {
    /// Registers a handle to this collector with `registry` (the handles
    /// share their values) and hands it back. Fails if one of the same name
    /// is registered there already.
    fn register(self, registry: &Registry) -> prometheus::Result<Self> {
        registry.register(Box::new(self.clone()))?;
        Ok(self)
    }
}

impl<C: Collector + Clone + 'static> Register for C {}

/// A vector of one label whose known series exist from the start, so that
/// a scrape shows zeros rather than nothing and `rate()` works from the
/// first increment.
pub trait WithSeries: Sized {
    /// Creates the series of each label value in `values`.
    fn with_series<V>(self, values: impl IntoIterator<Item = V>) -> Self
    where
        V: AsRef<str> + std::fmt::Debug;
}

impl<P: MetricVecBuilder> WithSeries for MetricVec<P> {
    fn with_series<V>(self, values: impl IntoIterator<Item = V>) -> Self
    where
        V: AsRef<str> + std::fmt::Debug,
    {
        for value in values {
            self.with_label_values(&[value]);
        }
        self
    }
}
