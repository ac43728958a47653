"""Server side: a Flower Strategy that validates updates and aggregates them with a registry rule."""

from strategies.aggregators import AGGREGATORS, build_aggregator
from strategies.robust import RobustStrategy

__all__ = ["AGGREGATORS", "RobustStrategy", "build_aggregator"]
