"""Differential privacy: DP-SGD through Opacus as the training engine's privacy hook
(:mod:`.dp_sgd`), each shard's cumulative accounting with a hard stop (:mod:`.accountant`), and
Gaussian DP for reporting and for calibrating noise to attack risk (:mod:`.gdp`)."""

from fairforget.privacy.accountant import ACCOUNTANTS, PrivacyBudgetExceeded, ShardAccountant, epsilon_of, summarize
from fairforget.privacy.dp_sgd import DPSGD, DPSettings
from fairforget.privacy.gdp import mu_of, noise_for_epsilon, noise_for_tpr, tpr_bound

__all__ = ["ACCOUNTANTS", "DPSGD", "DPSettings", "PrivacyBudgetExceeded", "ShardAccountant", "epsilon_of", "mu_of",
           "noise_for_epsilon", "noise_for_tpr", "summarize", "tpr_bound"]
