"""The study report: reading run folders, statistics, fairness checks, tables, figures and the HTML page.

May import every lower layer up to nfed.federation.
"""
