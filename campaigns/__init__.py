"""Campaigns: one long training run of one hero, fed job after job."""
