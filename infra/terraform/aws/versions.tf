terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.60"
    }
  }
}

# Credentials come from the standard AWS chain (environment, profile, SSO, instance role).
provider "aws" {
  region = var.region
  default_tags {
    tags = { project = var.name_prefix, managed-by = "terraform" }
  }
}
