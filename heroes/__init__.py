"""Heroes: model profiles (YAML files beside this module) and the offline builder of the tiny test hero."""
