"""The trainers' YAML configs, installed as package data of `featstore.configs`: `--config NAME`
(sharelock, uta, demo) finds NAME.yaml here (`featstore.trainers.config.config_path`)."""
