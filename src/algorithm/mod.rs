//! The LIB algorithm (method.md sections 3-7): statistics, bases and edges.
