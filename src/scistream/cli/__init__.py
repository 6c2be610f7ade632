"""Command-line interfaces (click): s2cs, s2uc, appctrl, scistream."""
