variable "region" {
  description = "AWS region of the buckets and the EMR Serverless application"
  type        = string
}

variable "name_prefix" {
  description = "Prefix of every resource name; bucket names also get the account id to be globally unique"
  type        = string
  default     = "admm-mnist"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.name_prefix))
    error_message = "name_prefix: 3-31 lowercase letters, digits or dashes, starting with a letter."
  }
}

variable "emr_release_label" {
  description = "EMR release of the Serverless application (Spark 3.5 on EMR 7.x)"
  type        = string
  default     = "emr-7.5.0"
}

variable "emr_serverless_image_uri" {
  description = "Custom EMR Serverless image with Python 3.11 (infra/docker/emr-serverless.Dockerfile); null: the release's image"
  type        = string
  default     = null
}

variable "max_vcpu" {
  description = "Upper bound of the application's total vCPU (caps the cost of a runaway job)"
  type        = number
  default     = 64
}

variable "max_memory_gb" {
  description = "Upper bound of the application's total memory in GB"
  type        = number
  default     = 256
}

variable "subnet_ids" {
  description = "Private subnets for the jobs (with an S3 gateway endpoint); empty: no VPC attachment"
  type        = list(string)
  default     = []
}

variable "security_group_ids" {
  description = "Security groups of the jobs when subnet_ids is set"
  type        = list(string)
  default     = []
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before it expires"
  type        = number
  default     = 90
}

variable "emr_cluster_ids" {
  description = "Existing EMR on EC2 clusters (j-...) Airflow may add the training step to (target emr)"
  type        = list(string)
  default     = []
}
